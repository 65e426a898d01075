"""bench/report.py: the ratio a reader sees pairs the two runs of each round."""

from __future__ import annotations

import statistics
from typing import Any

from bench.report import markdown, summarize

# New connections per second from a full run (bench/results/20261125-203632.json, 2
# workers): the machine got faster after the third round, for both balancers alike.
SPLICELB = [14347.2, 14271.0, 14354.2, 16502.4, 16049.1]
HAPROXY = [14818.8, 14942.9, 16944.3, 17445.5, 17096.6]


def close_runs(splicelb: list[float | None], haproxy: list[float | None]) -> list[dict[str, Any]]:
    """The ``close`` runs of ``bench/run.py`` in its order: splicelb, then HAProxy, each round."""
    runs = []
    for s, h in zip(splicelb, haproxy, strict=True):
        for target, value in (("splicelb", s), ("haproxy", h)):
            values = {} if value is None else {"http_close_cps": value}
            runs.append({"workers": 2, "kind": "close", "target": target, "values": values})
    return runs


def test_the_ratio_is_the_median_of_the_rounds_not_of_the_medians() -> None:
    figure = summarize(close_runs(SPLICELB, HAPROXY), [2])["2"]["http_close_cps"]
    by_round = [s / h for s, h in zip(SPLICELB, HAPROXY, strict=True)]
    assert figure["round_ratios"] == by_round
    assert figure["ratio"] == statistics.median(by_round)
    assert round(figure["ratio"], 2) == 0.95  # every round is 0.85 to 0.97
    assert round(figure["ratio_of_medians"], 2) == 0.85  # a slow median over a fast one
    assert figure["medians"]["splicelb"] == statistics.median(SPLICELB)
    assert figure["met"] is False


def test_a_failed_run_takes_only_its_own_round_out() -> None:
    splicelb: list[float | None] = [*SPLICELB[:2], None, *SPLICELB[3:]]
    figure = summarize(close_runs(splicelb, HAPROXY), [2])["2"]["http_close_cps"]
    kept = [0, 1, 3, 4]
    assert figure["round_ratios"] == [SPLICELB[i] / HAPROXY[i] for i in kept]
    assert figure["values"]["haproxy"] == HAPROXY  # its median still counts all five


def test_the_table_says_how_the_ratio_is_made() -> None:
    result = {
        "meta": {
            "versions": {"haproxy": "2.6.12"},
            "smoke": False,
            "started": "2026-11-25T20:36:32+0000",
            "machine": {"nproc": 2, "cpu": "x", "kernel": "6", "python": "3.11"},
            "splicelb_commit": "abc1234",
            "runs": 5,
            "notes": [],
        },
        "summary": summarize(close_runs(SPLICELB, HAPROXY), [2]),
    }
    table = markdown(result)
    row = next(line for line in table.splitlines() if line.startswith("| New connections/s"))
    assert "| 0.95 | ≥ 1 | **no** |" in row
    assert "median of the rounds' ratios" in table
