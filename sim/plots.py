"""Figures of a sweep: P99 latency against arrival rate, and the improvement heat-map."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def write_figures(doc: dict, out: Path) -> list[Path]:
    """Write fig_p99_vs_rate and fig_improvement_heatmap as PNG and PDF; return the paths."""
    patterns = doc["config"]["patterns"]
    strategies = doc["strategies"]
    rates = list(doc[patterns[0]])
    written = []

    fig, axes = plt.subplots(1, len(patterns), figsize=(6 * len(patterns), 4.5), squeeze=False)
    for ax, pattern in zip(axes[0], patterns):
        for name in strategies:
            y = [doc[pattern][r][name]["p99_mean"] / 1000.0 for r in rates]
            err = [doc[pattern][r][name]["p99_std"] / 1000.0 for r in rates]
            ax.errorbar([float(r) for r in rates], y, yerr=err, marker="o", capsize=2, label=name, lw=2.2 if name == "fcfs" else 1.2)
        ax.set(title=f"{pattern}: P99 latency", xlabel="arrival rate (req/s)", ylabel="P99 latency (s)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    written += _save(fig, out / "fig_p99_vs_rate")

    others = [s for s in strategies if s != "fcfs"]
    if "fcfs" in strategies and others:
        fig, axes = plt.subplots(1, len(patterns), figsize=(5 * len(patterns), 0.35 * len(others) + 1.8), squeeze=False)
        for ax, pattern in zip(axes[0], patterns):
            grid = np.array([[doc[pattern][r]["_improvements"][s]["p99_reduction_pct"] for r in rates] for s in others])
            lim = max(1.0, float(np.abs(grid).max()))
            im = ax.imshow(grid, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
            ax.set_xticks(range(len(rates)), rates)
            ax.set_yticks(range(len(others)), others)
            ax.set(title=f"{pattern}: P99 reduction vs FCFS (%)", xlabel="arrival rate (req/s)")
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:+.0f}", ha="center", va="center", fontsize=7)
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        written += _save(fig, out / "fig_improvement_heatmap")
    return written


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def twin_study_figure(study: dict, out: Path) -> list[Path]:
    """study.png: per admission cell, P99 ITL and TTFT against load for every arm; per dispatch
    cell, ITL P50 and TTFT P99 per policy."""
    cells = [(name, c, "admission") for name, c in study["admission"].items()] + \
            [(name, c, "dispatch") for name, c in study["dispatch"].items()]
    if not cells:
        return []
    fig, axes = plt.subplots(2, len(cells), figsize=(3.4 * len(cells), 6), squeeze=False)
    for j, (name, c, kind) in enumerate(cells):
        loads = list(c["loads"])
        arms = list(c["loads"][loads[0]]["arms"])
        top, bottom = ("itl_p99_ms", "ttft_p99_s") if kind == "admission" else ("itl_p50_ms", "ttft_p99_s")
        for arm in arms:
            xs = [float(x) for x in loads if arm in c["loads"][x]["arms"]]
            for ax, key in ((axes[0][j], top), (axes[1][j], bottom)):
                ys = [c["loads"][x]["arms"][arm][key] for x in loads if arm in c["loads"][x]["arms"]]
                ax.plot(xs, ys, marker="o", lw=2.2 if arm in ("stock", "least_loaded") else 1.0, label=arm)
        axes[0][j].set(title=f"{name}\n(capacity {c['capacity_rps']:.0f} req/s)", ylabel=top.replace("_", " "))
        axes[1][j].set(xlabel="load (x capacity)", ylabel=bottom.replace("_", " "))
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, out / "study")


def fidelity_figure(doc: dict, out: Path) -> list[Path]:
    """fidelity.png: the twin against live per repetition, one panel per figure, y = x dashed."""
    names = list(doc["cells"][0]["arms"][next(iter(doc["cells"][0]["arms"]))])
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        hi = 0.0
        for cell in doc["cells"]:
            for arm, figs in cell["arms"].items():
                f = figs[name]
                ax.scatter(f["live_runs"], f["twin_runs"], s=18, label=f"{cell['workload']} {arm}")
                hi = max(hi, *f["live_runs"], *f["twin_runs"])
        ax.plot([0, hi], [0, hi], "k--", lw=0.8)
        ax.set(title=name, xlabel="live", ylabel="twin")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=5)
    fig.tight_layout()
    return _save(fig, out / "fidelity")
