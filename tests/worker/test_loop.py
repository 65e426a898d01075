"""The worker's event loop: readiness, timers, signals and errors, on real descriptors."""

from __future__ import annotations

import os
import select
import signal
import socket
import struct
import time
from collections.abc import Callable, Iterator

import pytest

from lb.worker import loop as loop_module
from lb.worker.loop import RDHUP, Loop


@pytest.fixture
def errors() -> list[BaseException]:
    return []


@pytest.fixture(params=[0.0, 50e-6], ids=["sleeps", "busy-polls"])
def loop(request: pytest.FixtureRequest, errors: list[BaseException]) -> Iterator[Loop]:
    """Each test runs twice: sleeping as soon as nothing is ready, and busy polling."""
    loop = Loop(on_error=errors.append, busy_poll=request.param)
    watchdog = loop.call_later(5, loop.stop)  # a broken test ends instead of hanging
    yield loop
    watchdog.cancel()
    loop.shutdown()


def test_timers_fire_in_order_and_a_cancelled_one_never(loop: Loop) -> None:
    fired: list[str] = []
    started = time.monotonic()  # before the timers: a preemption here cannot shorten the wait
    loop.call_later(0.06, lambda: fired.append("late"))
    loop.call_later(0.02, lambda: fired.append("early"))
    loop.call_later(0.04, lambda: fired.append("cancelled")).cancel()
    loop.call_later(0.08, loop.stop)
    loop.run()
    assert fired == ["early", "late"]
    assert 0.08 <= time.monotonic() - started < 1.0


def test_a_timer_set_from_a_timer_fires(loop: Loop) -> None:
    fired: list[float] = []

    def again() -> None:
        fired.append(time.monotonic())
        if len(fired) < 3:
            loop.call_later(0.01, again)
        else:
            loop.stop()

    loop.call_later(0.01, again)
    loop.run()
    assert len(fired) == 3
    assert fired == sorted(fired)


def test_reader_hears_data_then_the_peers_end_of_file(loop: Loop) -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    heard: list[tuple[bytes, bool]] = []

    def readable() -> None:
        data = b.recv(100)
        heard.append((data, bool(loop.events & RDHUP)))
        if not data:
            loop.remove_reader(b.fileno())
            loop.stop()

    loop.add_reader(b.fileno(), readable)
    a.sendall(b"hello")
    loop.call_later(0.05, a.close)
    loop.run()
    assert heard[0] == (b"hello", False)
    assert heard[-1] == (b"", True)
    b.close()


def test_writer_then_reader_on_one_descriptor(loop: Loop) -> None:
    a, b = socket.socketpair()
    b.setblocking(False)
    steps: list[str] = []

    def writable() -> None:
        steps.append("writable")
        b.send(b"ping")
        loop.set(b.fileno(), readable, None)  # from write interest to read interest

    def readable() -> None:
        steps.append(b.recv(10).decode())
        loop.stop()

    loop.add_writer(b.fileno(), writable)
    loop.call_later(0.05, lambda: a.send(a.recv(10)))  # echo what b sent
    loop.run()
    assert steps == ["writable", "ping"]
    a.close()
    b.close()


def test_close_during_a_batch_is_deferred_until_the_batch_ends(loop: Loop) -> None:
    """A descriptor closed by an earlier callback of the same batch keeps its number
    until the batch is done, so a stale event cannot reach whoever reuses it."""
    pairs = [socket.socketpair() for _ in range(2)]
    seen_open: list[bool] = []
    first, second = pairs[0][1], pairs[1][1]
    fds = {first.fileno(), second.fileno()}

    def close_both() -> None:
        for fd in fds:
            loop.close(fd)
        seen_open.append(all(_is_open(fd) for fd in fds))
        loop.stop()

    for sock in (first, second):
        loop.add_reader(sock.detach(), close_both)
    for a, _ in pairs:
        a.send(b"x")
    loop.run()
    assert seen_open == [True]  # still open inside the batch
    assert not any(_is_open(fd) for fd in fds)  # closed once it ended
    for a, _ in pairs:
        a.close()


def test_signal_runs_its_callback_in_the_loop(loop: Loop) -> None:
    got: list[str] = []

    def on_usr1() -> None:
        got.append("usr1")
        loop.stop()

    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    loop.call_later(0.02, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    loop.run()
    assert got == ["usr1"]


def test_a_failing_callback_is_reported_and_the_loop_goes_on(
    loop: Loop, errors: list[BaseException]
) -> None:
    def boom() -> None:
        raise RuntimeError("bug in a callback")

    loop.call_later(0.01, boom)
    loop.call_later(0.03, loop.stop)
    loop.run()
    assert [str(e) for e in errors] == ["bug in a callback"]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_descriptor_whose_callback_fails_is_closed_and_not_called_again(
    loop: Loop, errors: list[BaseException]
) -> None:
    """Level-triggered readiness would report it on every turn: the bug must not spin,
    and its descriptor must not leak."""
    a, b = socket.socketpair()
    fd = b.detach()
    calls: list[int] = []

    def broken() -> None:
        calls.append(1)
        raise ValueError("bug in a reader")

    loop.add_reader(fd, broken)
    a.send(b"never read")  # stays readable
    loop.call_later(0.1, loop.stop)
    loop.run()
    assert calls == [1]
    assert [str(e) for e in errors] == ["bug in a reader"]
    assert not _is_open(fd)
    a.close()


def test_a_failing_callback_is_handed_to_its_owner(loop: Loop, errors: list[BaseException]) -> None:
    """The owner of a failing callback (an object with ``fail``) ends what it owns; the
    loop reports the error once and leaves the descriptor to the owner."""
    a, b = socket.socketpair()
    b.setblocking(False)

    class Owner:
        failed: list[BaseException] = []

        def on_readable(self) -> None:
            raise ValueError("bug in an owned reader")

        def fail(self, exc: BaseException) -> None:
            self.failed.append(exc)
            loop.remove_reader(b.fileno())  # what a connection does: stop, close, count
            loop.stop()

    owner = Owner()
    loop.add_reader(b.fileno(), owner.on_readable)
    a.send(b"x")
    loop.run()
    assert [str(e) for e in owner.failed] == ["bug in an owned reader"]
    assert [str(e) for e in errors] == ["bug in an owned reader"]
    assert _is_open(b.fileno())  # the owner's to close
    a.close()
    b.close()


def test_a_protected_descriptor_stays_open_when_its_callback_fails(
    loop: Loop, errors: list[BaseException]
) -> None:
    a, b = socket.socketpair()
    loop.protect(b.fileno())

    def broken() -> None:
        loop.remove_reader(b.fileno())
        loop.call_later(0.02, loop.stop)
        raise ValueError("bug in a listener's reader")

    loop.add_reader(b.fileno(), broken)
    a.send(b"x")
    loop.run()
    assert _is_open(b.fileno())
    assert len(errors) == 1
    a.close()
    b.close()


def test_a_failure_watch_hears_a_reset_but_not_data(loop: Loop) -> None:
    """A source that is not read (its tunnel's other side is full) still ends on a reset."""
    a, b = socket.create_server(("127.0.0.1", 0)), None
    near = socket.create_connection(a.getsockname())
    b, _ = a.accept()
    b.setblocking(False)
    heard: list[int] = []

    def failed() -> None:
        heard.append(loop.events)
        loop.remove_reader(b.fileno())
        loop.stop()

    loop.watch_failure(b.fileno(), failed)
    near.send(b"data is not heard")
    near.shutdown(socket.SHUT_WR)  # nor is an end of file: a half-close is not a failure
    loop.call_later(0.05, lambda: _reset(near))
    loop.run()
    assert len(heard) == 1 and heard[0] & select.EPOLLERR
    for sock in (a, b):
        sock.close()


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_a_failing_signal_callback_does_not_deafen_the_loop_to_signals(
    loop: Loop, errors: list[BaseException]
) -> None:
    got: list[int] = []

    def on_usr1() -> None:
        got.append(len(got))
        if len(got) == 1:
            raise RuntimeError("bug in a signal callback")
        loop.stop()

    loop.add_signal_handler(signal.SIGUSR1, on_usr1)
    loop.call_later(0.02, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    loop.call_later(0.08, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    loop.call_later(2.0, loop.stop)  # deaf: the second signal never arrives
    loop.run()
    assert got == [0, 1]
    assert [str(e) for e in errors] == ["bug in a signal callback"]


def heard_by(
    loop: Loop, then: Callable[[list[bytes]], None] | None = None
) -> tuple[socket.socket, socket.socket, list[bytes]]:
    """A socket pair whose second end ``loop`` reads: what is sent to the first is
    heard, in order (``then(heard)`` after each read)."""
    a, b = socket.socketpair()
    heard: list[bytes] = []

    def readable() -> None:
        heard.append(b.recv(100))
        if then is not None:
            then(heard)

    loop.add_reader(b.fileno(), readable)
    return a, b, heard


@pytest.fixture
def cpu_to_itself(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A CPU with no other task to run: every sched_yield returns at once, and no
    yield counts as giving the CPU away (on a real machine a preemption in the middle
    of one may, and that ends the polling).  The times of the yields, one per poll."""
    polls: list[float] = []
    monkeypatch.setattr(os, "sched_yield", lambda: polls.append(time.monotonic()))
    monkeypatch.setattr(loop_module, "CONTENDED", float("inf"))
    return polls


@pytest.mark.parametrize("busy_poll", [0.0, 0.1])
def test_busy_polling_lasts_its_time_after_work_then_the_loop_sleeps(
    cpu_to_itself: list[float], busy_poll: float
) -> None:
    """What an operator sees in the worker's CPU time: after each piece of work the
    loop polls on for ``busy_poll`` (here 100 ms, to be measurable), then sleeps for
    the rest of the idle half second.  Each poll follows a yield, counted here; the
    yields return at once, as on a CPU with no other task to run (the loop's share of
    the CPU changes how many polls it makes, not when they end)."""
    polls = cpu_to_itself
    loop = Loop(on_error=lambda exc: None, busy_poll=busy_poll)
    a, b, heard = heard_by(loop)
    a.sendall(b"work")
    loop.call_later(0.5, loop.stop)  # idle for the rest of the half second
    loop.run()
    loop.shutdown()
    a.close()
    b.close()
    assert heard == [b"work"]
    if busy_poll:
        assert len(polls) > 10
        assert busy_poll - 0.01 < polls[-1] - polls[0] < busy_poll + 0.05
    else:
        assert polls == []


@pytest.mark.parametrize(("calm_after", "yields"), [(10.0, 1), (0.0, 3)])
def test_busy_polling_stops_for_a_while_once_a_yield_gives_the_cpu_away(
    monkeypatch: pytest.MonkeyPatch, calm_after: float, yields: int
) -> None:
    """On a machine as busy as its cores, a worker that yields waits in the run queue
    behind the other tasks for as long as a time slice, where a sleeping one is woken
    by its next event.  Here each yield gives the CPU to another task for 1 ms: the
    first ends the polling, and the loop sleeps after each of its next pieces of work
    until ``CALM_AFTER`` has passed (with none, it tries one yield after each of the
    three pieces before the last).  Polling on, it would make a hundred yields in its
    100 ms of ``busy_poll`` after each piece."""
    made: list[float] = []

    def busy_cpu() -> None:
        made.append(time.monotonic())
        time.sleep(0.001)

    monkeypatch.setattr(os, "sched_yield", busy_cpu)
    monkeypatch.setattr(loop_module, "CALM_AFTER", calm_after)
    loop = Loop(on_error=lambda exc: None, busy_poll=0.1)

    def next_piece(heard: list[bytes]) -> None:  # 20 ms after the last is heard
        if len(heard) < 4:
            loop.call_later(0.02, lambda: a.sendall(b"more"))
        else:
            loop.stop()  # in the turn of the last piece: no idle time after it

    a, b, heard = heard_by(loop, next_piece)
    a.sendall(b"work")
    loop.call_later(5, loop.stop)  # a broken test ends instead of hanging
    loop.run()
    loop.shutdown()
    a.close()
    b.close()
    assert heard == [b"work", b"more", b"more", b"more"]
    assert len(made) == yields


@pytest.mark.usefixtures("cpu_to_itself")
@pytest.mark.parametrize("busy_poll", [0.0, 0.1])
def test_on_idle_runs_between_busy_polls_and_never_wakes_the_loop(busy_poll: float) -> None:
    """A worker takes another's queued connections from ``on_idle``: while it polls
    after work, it finds them; asleep, it is not woken for them."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    taken: list[socket.socket] = []

    def take() -> bool:  # like Worker._take, on a socket the loop does not watch
        try:
            taken.append(listener.accept()[0])
        except BlockingIOError:
            return False
        return True

    loop = Loop(on_error=lambda exc: None, busy_poll=busy_poll, on_idle=take)
    a, b = socket.socketpair()
    clients: list[socket.socket] = []

    def readable() -> None:  # the work: it has a client connect to that listener
        b.recv(100)
        clients.append(socket.create_connection(listener.getsockname()))

    loop.add_reader(b.fileno(), readable)
    a.sendall(b"work")
    loop.call_later(0.3, loop.stop)
    loop.run()
    loop.shutdown()
    for sock in (a, b, listener, *clients, *taken):
        sock.close()
    assert len(clients) == 1
    assert len(taken) == (1 if busy_poll else 0)


def test_at_turn_end_runs_once_after_every_callback_of_the_turn() -> None:
    """Work the callbacks of one turn share (the conn lines' write) is done once, after
    all of them, and a failing one is reported without stopping the others."""
    errors: list[BaseException] = []
    loop = Loop(on_error=errors.append)
    order: list[str] = []
    pipes = [os.pipe() for _ in range(3)]

    def reader(i: int, fd: int) -> Callable[[], None]:
        def read() -> None:
            os.read(fd, 1)
            order.append(f"read {i}")
            if i == 0:
                loop.at_turn_end(lambda: order.append("end"))
                loop.at_turn_end(lambda: 1 / 0)
                loop.at_turn_end(loop.stop)

        return read

    for i, (r, w) in enumerate(pipes):
        loop.add_reader(r, reader(i, r))
        os.write(w, b"x")
    loop.run()
    assert sorted(order[:3]) == ["read 0", "read 1", "read 2"]  # one turn: all were ready
    assert order[3:] == ["end"]
    assert [type(e) for e in errors] == [ZeroDivisionError]
    for r, w in pipes:
        os.close(r)
        os.close(w)
