"""splicelb's variants in the benchmark: what each adds to the config, and how bench/cpu.py
compares one with another round by round."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from bench.cpu import median_interval, versus
from bench.procs import REPO, BenchError, Proc
from bench.servers import (
    FRONTS,
    VARIANTS,
    checkout,
    splicelb_stdout,
    splicelb_toml,
    target_toml,
)
from lb.config import Config, parse_config, read_toml

LISTENERS = [("bulk", 8001, "tcp", 9001), ("http", 8002, "tcp", 9002), ("ws", 8003, "http", 9003)]
WRK_CONNECTIONS = 32  # bench/cpu.py's wrk -c


def config_of(variant: str | None, tmp_path: Path) -> Config:
    """The config of splicelb (None) or of a variant: its http listener changed."""
    listeners, extra = list(LISTENERS), {}
    if variant is not None:
        mode, listener_extra, backend_extra, _server = VARIANTS[variant]
        listeners[1] = ("http", 8002, mode, 9002)
        extra["http"] = (listener_extra, backend_extra)
    path = tmp_path / "splicelb.toml"
    path.write_text(splicelb_toml(tmp_path / "run", 1, listeners, extra))
    return parse_config(read_toml(path))


def test_splicelb_limits_limits_the_measured_listener_and_refuses_none_of_the_benchmark(
    tmp_path: Path,
) -> None:
    plain = config_of(None, tmp_path)
    limited = config_of("splicelb-limits", tmp_path)
    assert not any(lc.limits_clients for lc in plain.listeners)
    [lc] = [lc for lc in limited.listeners if lc.name == "http"]
    # both limits, each far above what one client of the benchmark does
    assert lc.client_maxconn > 100 * WRK_CONNECTIONS
    assert lc.client_rate >= 1e6 and lc.client_burst >= 1e6


def test_a_variant_is_compared_with_its_baseline_round_by_round() -> None:
    """The median of the rounds' ratios, not the ratio of the medians (the machine's speed
    drifts between rounds)."""
    variant = [{"rate": 95}, {"rate": 190}, {"rate": 50}]
    baseline = [{"rate": 100}, {"rate": 200}, {"rate": 40}]
    assert versus(variant, baseline) == 0.95


def test_the_median_ratios_interval_widens_as_the_rounds_get_fewer() -> None:
    """The 90% interval of 16 rounds leaves out the 4 lowest and the 4 highest ratios
    (fewer below the median than 5 has a chance of 3.8%); of 8 rounds, the lowest and
    the highest; 4 rounds are too few for one."""
    ratios = [0.80 + i / 100 for i in range(16)]
    assert median_interval(ratios[::-1]) == (ratios[4], ratios[11])
    assert median_interval(ratios[:8]) == (ratios[1], ratios[6])
    assert median_interval(ratios[:5]) == (ratios[0], ratios[4])
    assert median_interval(ratios[:4]) is None


def test_a_balancer_at_an_earlier_commit_runs_that_commits_code(tmp_path: Path) -> None:
    """``NAME@REV``: the tree ``bench.servers.checkout`` gives holds the commit's files,
    not this tree's, and a name that is no commit is refused before anything starts."""
    first = subprocess.run(
        ["git", "-C", str(REPO), "rev-list", "--max-parents=0", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[0]
    tree = checkout(first, tmp_path)
    assert tree == checkout(first, tmp_path)  # once per run
    listed = subprocess.run(
        ["git", "-C", str(REPO), "ls-tree", "-r", "--name-only", first],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()) == sorted(
        listed
    )
    with pytest.raises(BenchError, match="not a commit"):
        checkout("no-such-commit", tmp_path)


def test_the_defaults_variant_adds_no_key_an_earlier_config_would_refuse(tmp_path: Path) -> None:
    """``splicelb-http-defaults@REV`` runs old code: its config may hold no key that came
    later, only an http listener with its defaults."""
    mode, listener_extra, backend_extra, _server = VARIANTS["splicelb-http-defaults"]
    assert (mode, listener_extra, backend_extra) == ("http", "", "")
    [lc] = [
        lc for lc in config_of("splicelb-http-defaults", tmp_path).listeners if lc.name == "http"
    ]
    assert lc.mode == "http" and lc.forwarded_headers


def test_stdout_suffixes_send_splicelbs_lines_elsewhere_and_leave_its_config_alone(
    tmp_path: Path,
) -> None:
    """``+null`` and ``+pipe`` change where the lines go, not what the config says."""
    ports = {front: 8000 + i for i, front in enumerate(FRONTS)}
    servers = {"bulk": 9001, "http": 9002, "ws": 9003, "http_pp": 9004, "https": 9005}
    toml = target_toml("splicelb+info+pipe", tmp_path / "run", 1, ports, servers)
    assert toml == target_toml("splicelb+info", tmp_path / "run", 1, ports, servers)
    assert splicelb_stdout("splicelb+info", tmp_path) is None  # its log file
    null = splicelb_stdout("splicelb+null", tmp_path)
    assert null is not None
    try:
        assert os.path.samestat(os.fstat(null), os.stat(os.devnull))
    finally:
        os.close(null)
    pipe = splicelb_stdout("splicelb+info+pipe", tmp_path)
    assert pipe is not None
    [reader] = [p for p in Proc.live if p.name == "splicelb-stdout"]
    try:
        assert stat.S_ISFIFO(os.fstat(pipe).st_mode)
        os.write(pipe, b"x" * 200_000)  # more than a pipe holds: only a reader lets it through
        os.close(pipe)
        assert reader.popen.wait(timeout=10) == 0  # it read to the end
    finally:
        reader.kill()
