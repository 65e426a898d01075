"""The pipe plan (the per-user budget's arithmetic) and the pools built from it (real pipes)."""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.worker import pipes
from lb.worker.pipes import (
    CAP_SYS_ADMIN,
    CAP_SYS_RESOURCE,
    F_GETPIPE_SZ,
    KEEP_PIPES,
    MIN_LARGE,
    PAGE,
    PIPE_SIZE,
    RESERVE_PART,
    UNLIMITED,
    PipePlan,
    PipePool,
    discard,
    plan_for_worker,
    plan_pipes,
)

MiB = 1 << 20
KiB = 1 << 10
NET_BIND = 1 << 10  # CAP_NET_BIND_SERVICE alone: what systemd/splicelb.service leaves the service
ADMIN = 1 << CAP_SYS_ADMIN
RESOURCE = 1 << CAP_SYS_RESOURCE
SOFT = 16384  # the kernel's default fs.pipe-user-pages-soft: 64 MiB of 4 KiB pages


def plan(
    workers: int,
    soft: int = SOFT,
    capabilities: int = NET_BIND,
    page: int = 4096,
    max_size: int = MiB,
    hard: int = 0,
) -> PipePlan:
    return plan_pipes(workers, soft, capabilities, page, max_size, hard)


# -- the plan --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("capabilities", "soft"),
    [(ADMIN, SOFT), (RESOURCE, SOFT), (ADMIN | RESOURCE, SOFT), (NET_BIND, 0)],
    ids=["CAP_SYS_ADMIN", "CAP_SYS_RESOURCE", "both", "soft limit 0"],
)
def test_without_a_budget_every_pipe_is_enlarged_and_64_are_kept(
    capabilities: int, soft: int
) -> None:
    p = plan(2, soft, capabilities)
    assert (p.size, p.large, p.keep, p.budget) == (MiB, UNLIMITED, KEEP_PIPES, 0)
    assert p.warnings() == []


@pytest.mark.parametrize(("workers", "large"), [(1, 48), (2, 24), (4, 12)])
def test_as_the_unit_runs_it_the_workers_share_the_budget(workers: int, large: int) -> None:
    """No CAP_SYS_RESOURCE or CAP_SYS_ADMIN, fs.pipe-user-pages-soft at its default:
    the old pool of 64 pipes of 1 MiB per worker took all 16,384 pages with one worker."""
    p = plan(workers)
    assert (p.size, p.large, p.keep, p.budget, p.default_size) == (
        MiB,
        large,
        large,
        SOFT,
        64 * KiB,
    )
    large_pages = workers * p.large * (MiB // 4096)
    assert large_pages <= SOFT * 3 // 4  # a quarter left for pipes of the default size
    assert (SOFT - large_pages) // 16 >= 256  # that many 64 KiB pipes past the plan, not 8 KiB


def test_with_many_workers_the_size_is_halved_before_giving_up_enlarging() -> None:
    eight = plan(8)
    assert (eight.size, eight.large, eight.keep) == (512 * KiB, 12, 12)
    sixty_four = plan(64)  # 192 pages each past the reserve: only pipes of the default size
    assert (sixty_four.size, sixty_four.large, sixty_four.keep) == (64 * KiB, 0, 12)


@pytest.mark.parametrize(("workers", "needed"), [(1, 21845), (2, 43690), (4, 87380)])
def test_needed_is_the_least_soft_limit_that_gives_every_worker_its_full_pool(
    workers: int, needed: int
) -> None:
    full = plan(workers, soft=needed)
    assert (full.needed, full.size, full.keep, full.warnings()) == (needed, MiB, KEEP_PIPES, [])
    short = plan(workers, soft=needed - 1)
    assert short.keep < KEEP_PIPES
    assert [w["sysctl"] for w in short.warnings()] == ["fs.pipe-user-pages-soft"]


def test_the_warning_names_the_sysctl_its_value_and_the_value_to_set() -> None:
    assert plan(2).warnings() == [
        {
            "sysctl": "fs.pipe-user-pages-soft",
            "value": SOFT,
            "needed": 43690,
            "workers": 2,
            "pipe_size": MiB,
            "large_pipes": 24,
            "keep": 24,
            "fix": "sysctl -w fs.pipe-user-pages-soft=43690",
        }
    ]


def test_a_hard_limit_below_the_soft_one_is_the_budget() -> None:
    p = plan(2, soft=0, hard=8192)
    assert (p.budget, p.large) == (8192, 12)
    assert [(w["sysctl"], w["value"]) for w in p.warnings()] == [("fs.pipe-user-pages-hard", 8192)]


def test_pipe_max_size_caps_a_pipe_unless_cap_sys_resource() -> None:
    capped = plan(1, soft=10**6, max_size=256 * KiB)
    assert (capped.size, capped.keep) == (256 * KiB, KEEP_PIPES)
    [warning] = capped.warnings()
    assert (warning["sysctl"], warning["value"], warning["needed"]) == (
        "fs.pipe-max-size",
        256 * KiB,
        MiB,
    )
    admin = plan(1, max_size=256 * KiB, capabilities=ADMIN)  # out of the budget, not the cap
    assert (admin.size, admin.budget, admin.large) == (256 * KiB, 0, UNLIMITED)
    resource = plan(1, max_size=256 * KiB, capabilities=RESOURCE)
    assert (resource.size, resource.warnings()) == (MiB, [])


@given(
    workers=st.integers(1, 256),
    soft=st.integers(0, 1 << 22),
    hard=st.sampled_from([0, 0, 4096, 1 << 16]),
    page_shift=st.sampled_from([12, 14, 16]),
    max_shift=st.integers(12, 21),
    capabilities=st.sampled_from([0, NET_BIND, ADMIN, RESOURCE]),
)
def test_every_plan_leaves_the_reserve_and_says_when_it_is_cut(
    workers: int, soft: int, hard: int, page_shift: int, max_shift: int, capabilities: int
) -> None:
    page, max_size = 1 << page_shift, 1 << max(page_shift, max_shift)
    p = plan(workers, soft, capabilities, page, max_size, hard)
    pages = p.size // page
    assert pages & (pages - 1) == 0  # F_SETPIPE_SZ rounds to a power of two pages
    assert p.default_size <= p.size <= (PIPE_SIZE if capabilities & RESOURCE else max_size)
    assert 0 <= p.keep <= KEEP_PIPES
    if not p.budget:
        assert p.keep == KEEP_PIPES and p.large in (0, UNLIMITED)
        return
    share = p.budget // workers
    assert p.large == 0 or p.large >= MIN_LARGE or p.size == p.default_size
    assert p.keep * pages <= share - share // RESERVE_PART  # idle pipes fit too
    assert workers * (p.large * pages + share // RESERVE_PART) <= p.budget
    assert bool(p.warnings()) == (p.keep < KEEP_PIPES or p.size < PIPE_SIZE)


def test_unreadable_sysctls_are_assumed_to_be_the_kernel_defaults_and_the_warning_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(pipes, "SYSCTLS", str(tmp_path / "hidden"))  # as with ProcSubset=pid
    monkeypatch.setattr(pipes, "effective_capabilities", lambda: NET_BIND)
    p = plan_for_worker(2)
    assert p.assumed and p.budget == SOFT
    [warning] = p.warnings()
    assert "ProcSubset=pid" in warning["note"]


def test_the_plan_of_this_process_reads_its_capabilities_and_the_sysctls() -> None:
    def sysctl(name: str) -> int:
        return int(Path(f"/proc/sys/fs/{name}").read_text())

    expected = plan_pipes(
        2,
        sysctl("pipe-user-pages-soft"),
        pipes.effective_capabilities(),
        PAGE,
        sysctl("pipe-max-size"),
        sysctl("pipe-user-pages-hard"),
    )
    assert PipePool.for_worker(2).plan == expected


# -- the pools -------------------------------------------------------------------


@pytest.fixture
def made() -> Iterator[list[PipePool]]:
    """Pools a test makes; closed at the end."""
    pools: list[PipePool] = []
    yield pools
    for pool in pools:
        pool.close()


def real_size(pipe: tuple[int, int, int]) -> int:
    return int(fcntl.fcntl(pipe[1], F_GETPIPE_SZ))


def test_pipepool_keeps_its_defaults(made: list[PipePool]) -> None:
    pool = PipePool()
    made.append(pool)
    assert (pool.size, pool.keep) == (PIPE_SIZE, KEEP_PIPES)
    pipe = pool.new()
    assert pipe[2] == PIPE_SIZE // PAGE == real_size(pipe) // PAGE
    pool.give(pipe)
    assert pool.free == [pipe]
    # where no budget applies, a worker's pool is this one: the same hot path as before
    assert type(PipePool.from_plan(plan(2, capabilities=ADMIN))) is PipePool


def eight_large() -> PipePlan:
    """A plan of 8 large pipes: a share whose part past the reserve holds 8 pipes of 1 MiB."""
    large_pages = PIPE_SIZE // PAGE
    share = pipes.share_for(8 * large_pages)
    p = plan_pipes(1, share, NET_BIND, PAGE, PIPE_SIZE)
    assert (p.large, p.keep, p.size) == (8, 8, PIPE_SIZE)
    return p


def test_a_pool_past_its_plan_makes_pipes_of_the_default_size(made: list[PipePool]) -> None:
    """Even where the kernel would allow more (root here), the pool enlarges only its 8."""
    pool = PipePool.from_plan(eight_large())
    made.append(pool)
    taken = [pool.new() for _ in range(12)]
    assert [real_size(p) for p in taken] == [PIPE_SIZE] * 8 + [16 * PAGE] * 4
    assert [p[2] for p in taken] == [PIPE_SIZE // PAGE] * 8 + [16] * 4
    for pipe in reversed(taken):  # the default ones come back first
        pool.give(pipe)
    assert pool.free == taken[7::-1]  # kept: the large ones only


def test_a_large_pipe_closed_by_its_tunnel_is_counted_as_gone(made: list[PipePool]) -> None:
    """A tunnel that closes with bytes in its pipe calls ``discard`` (Flow.release), not
    the pool: the pool may then enlarge another."""
    pool = PipePool.from_plan(eight_large())
    made.append(pool)
    taken = [pool.new() for _ in range(8)]
    assert pool.new()[2] == 16  # past the plan
    discard(taken.pop())
    assert pool.new()[2] == PIPE_SIZE // PAGE
    assert pool.holding() == 8
    for pipe in taken:
        pool.give(pipe)
    pool.close()
    assert pool.holding() == 1  # the one still out


def test_drain_closes_the_idle_pipes_and_keeps_none(made: list[PipePool]) -> None:
    pool = PipePool.from_plan(eight_large())
    made.append(pool)
    taken = [pool.new() for _ in range(3)]
    pool.give(taken[0])
    pool.give(taken[1])
    pool.drain()
    assert pool.free == [] and pool.holding() == 1
    with pytest.raises(OSError):  # closed (no descriptor was made since)
        os.fstat(taken[0][1])
    pool.give(taken[2])
    assert pool.free == [] and pool.holding() == 0


def test_a_refused_enlargement_is_reported_once_and_the_pipe_still_works(
    made: list[PipePool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel says EPERM when the user's other pipes took the budget (here, forced)."""
    real_fcntl = fcntl.fcntl

    def refuse(fd: int, cmd: int, arg: int = 0) -> Any:
        if cmd == pipes.F_SETPIPE_SZ:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(pipes.fcntl, "fcntl", refuse)
    reports: list[dict[str, Any]] = []
    pool = PipePool.from_plan(plan(2, soft=SOFT, page=PAGE), on_refused=reports.append)
    made.append(pool)
    first, second = pool.new(), pool.new()
    assert first[2] == second[2] == 16
    [report] = reports
    assert report == report | {"error": "EPERM", "pipe_size": PIPE_SIZE, "large_pipes": 0}
    assert report["workers"] == 2 and report["planned"] == pool.plan.large  # type: ignore[union-attr]
    assert "fs.pipe-user-pages-soft = 16384" in report["note"]
    discard(first)
    discard(second)
