"""Results: medians and ratios, then the JSON, the Markdown tables and the PNG chart."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from bench.figures import FIGURES, KINDS, Figure

TARGETS = ("direct", "haproxy", "splicelb")


def round_ratios(runs: list[dict[str, Any]], workers: int, key: str) -> list[float]:
    """splicelb / HAProxy for figure ``key``, round by round.

    Round i is the i-th splicelb run and the i-th HAProxy run of the figure's
    kind, which ran back to back (``run.order``); a round where either run
    failed has no ratio.  The machine's speed drifts by several percent over
    minutes, alike for both runs of a round: a ratio of the two medians can
    put a slow round's value over a fast round's (in one run, new connections
    with 2 workers came out 0.85 that way, against 0.95 round by round).
    """
    rounds: dict[str, list[float | None]] = {"splicelb": [], "haproxy": []}
    for r in runs:
        if r["workers"] == workers and r["target"] in rounds and key in KINDS[r["kind"]][1]:
            rounds[r["target"]].append(r["values"].get(key))
    return [
        s / h
        for s, h in zip(rounds["splicelb"], rounds["haproxy"], strict=False)
        if s is not None and h
    ]


def summarize(runs: list[dict[str, Any]], workers: list[int]) -> dict[str, Any]:
    """Per worker count and figure: every run's value, the medians, the ratio and the goal.

    The ratio is the median of the rounds' ratios (:func:`round_ratios`); the
    ratio of the two medians is kept next to it.
    """
    out: dict[str, Any] = {}
    for w in workers:
        figures: dict[str, Any] = {}
        for fig in FIGURES:
            values = {
                t: [
                    r["values"][fig.key]
                    for r in runs
                    if r["workers"] == w and r["target"] == t and fig.key in r["values"]
                ]
                for t in TARGETS
            }
            medians = {t: (statistics.median(v) if v else None) for t, v in values.items()}
            s, h = medians["splicelb"], medians["haproxy"]
            ratios = round_ratios(runs, w, fig.key)
            ratio = statistics.median(ratios) if ratios else None
            figures[fig.key] = {
                "label": fig.label,
                "unit": fig.unit,
                "better": "higher" if fig.higher_is_better else "lower",
                "direct_applicable": fig.direct,
                "values": values,
                "medians": medians,
                "ratio": ratio,
                "round_ratios": ratios,
                "ratio_of_medians": s / h if s is not None and h else None,
                "goal": fig.goal_text,
                "met": None if ratio is None else fig.met(ratio),
            }
        out[str(w)] = figures
    return out


def _fmt(value: float | None, fig: Figure) -> str:
    if value is None:
        return "n/a"
    if fig.unit == "Gbit/s":
        return f"{value:.2f}"
    if fig.unit in ("µs", "segments"):
        return f"{value:.1f}"
    return f"{value:,.0f}"


def _cell(values: list[float], median: float | None, fig: Figure) -> str:
    text = _fmt(median, fig)
    if len(values) > 1:
        text += f" <sub>({_fmt(min(values), fig)} to {_fmt(max(values), fig)})</sub>"
    return text


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"# splicelb vs HAProxy {meta['versions']['haproxy']}"
        f"{' (smoke run: not a measurement)' if meta['smoke'] else ''}",
        "",
    ]
    lines.append(
        f"{meta['started']}, {meta['machine']['nproc']} cores "
        f"({meta['machine']['cpu']}), kernel {meta['machine']['kernel']}, "
        f"Python {meta['machine']['python']}, splicelb {meta['splicelb_commit']}, "
        f"{meta['runs']} run(s) per balancer and figure (alternated), "
        f"median shown with (min to max); splicelb / HAProxy is the median of the rounds' "
        f"ratios, each round a splicelb run and a HAProxy run back to back."
    )
    lines.append("")
    balancers = meta.get("balancers", {"splicelb": "splicelb", "haproxy": "haproxy"})
    if balancers != {"splicelb": "splicelb", "haproxy": "haproxy"}:
        lines += [
            f"**Not against HAProxy**: the column HAProxy is `{balancers['haproxy']}`, the "
            f"column splicelb is `{balancers['splicelb']}`.",
            "",
        ]
    for w, figures in result["summary"].items():
        lines += [
            f"## {w} worker{'s' if w != '1' else ''} "
            f"(splicelb `workers = {w}`, HAProxy `nbthread {w}`)",
            "",
            "| figure | direct | HAProxy | splicelb | splicelb / HAProxy | goal | met |",
            "|---|---:|---:|---:|---:|---|---|",
        ]
        for fig in FIGURES:
            f = figures[fig.key]
            vals, med = f["values"], f["medians"]
            ratio = "n/a" if f["ratio"] is None else f"{f['ratio']:.2f}"
            met = {None: "n/a", True: "yes", False: "**no**"}[f["met"]]
            if fig.goal is None:
                met = "—"
            lines.append(
                f"| {fig.label} ({fig.unit}, {f['better']} is better) "
                f"| {_cell(vals['direct'], med['direct'], fig)} "
                f"| {_cell(vals['haproxy'], med['haproxy'], fig)} "
                f"| {_cell(vals['splicelb'], med['splicelb'], fig)} "
                f"| {ratio} | {f['goal']} | {met} |"
            )
        lines.append("")
    lines += ["## Notes", ""] + [f"- {note}" for note in meta["notes"]] + [""]
    return "\n".join(lines)


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib  # noqa: PLC0415  (imported late: installed by the run if missing)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FuncFormatter  # noqa: PLC0415

    summary = result["summary"]
    worker_counts = list(summary)
    width = 0.8 / max(1, len(worker_counts))
    fig, ax = plt.subplots(figsize=(16, 6), dpi=110)
    colors = ["#4c72b0", "#dd8452", "#55a868", "#c44e52"]
    for i, w in enumerate(worker_counts):
        xs, ys, explains = [], [], []
        for x, f in enumerate(FIGURES):
            ratio = summary[w][f.key]["ratio"]
            if ratio:
                xs.append(x - 0.4 + width * (i + 0.5))
                ys.append(ratio)
                explains.append(f.goal is None)
        bars = ax.bar(
            xs,
            ys,
            width * 0.9,
            color=colors[i % len(colors)],
            label=f"{w} worker{'s' if w != '1' else ''} / nbthread {w}",
        )
        for bar, y, explain in zip(bars, ys, explains, strict=True):
            if explain:  # a figure without a goal: hatched, it explains the others
                bar.set_hatch("//")
                bar.set_alpha(0.55)
            ax.annotate(
                f"{y:.2f}",
                (bar.get_x() + bar.get_width() / 2, y),
                ha="center",
                va="bottom",
                fontsize=8,
            )
    for x, f in enumerate(FIGURES):
        if f.goal is not None:
            ax.hlines(
                f.goal,
                x - 0.45,
                x + 0.45,
                colors="black",
                linestyles="dashed",
                label="goal" if x == 0 else "_nolegend_",
            )
    ax.axhline(1.0, color="grey", linewidth=0.6)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    ax.set_xticks(range(len(FIGURES)))
    ax.set_xticklabels(
        [
            f"{f.short}\n({'higher' if f.higher_is_better else 'lower'} is "
            f"better,\n{'goal ' + f.goal_text if f.goal is not None else 'no goal'})"
            for f in FIGURES
        ],
        fontsize=8,
    )
    ax.set_ylabel("splicelb / HAProxy (median of the rounds' ratios, log scale)")
    smoke = " — smoke run, not a measurement" if result["meta"]["smoke"] else ""
    ax.set_title(
        f"splicelb vs HAProxy {result['meta']['versions']['haproxy']}, "
        f"{result['meta']['machine']['nproc']} cores{smoke}"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(result: dict[str, Any], outdir: Path, stamp: str, latest: bool) -> dict[str, Path]:
    """Write ``<stamp>.json/.md/.png`` (and copy them to ``latest.*``); return the paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {ext: outdir / f"{stamp}.{ext}" for ext in ("json", "md", "png")}
    tmp = paths["json"].with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    tmp.replace(paths["json"])
    paths["md"].write_text(markdown(result))
    chart(result, paths["png"])
    if latest:
        for ext, path in paths.items():
            shutil.copyfile(path, outdir / f"latest.{ext}")
    return paths
