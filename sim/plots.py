"""Figures of the simulator's and the studies' results (PNG and PDF, next to their JSON)."""

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
            ax.errorbar(
                [float(r) for r in rates],
                y,
                yerr=err,
                marker="o",
                capsize=2,
                label=name,
                lw=2.2 if name == "fcfs" else 1.2,
            )
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


def model_figure(doc: dict, out: Path) -> list[Path]:
    """model.png: the training curve, the topic skew per layer (trained, untrained, the real models'
    band) and the one-topic-vs-mixed distinct-expert gap against batch size beside the real models'."""
    curve = doc["training"]["curve"]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 3.8))
    pts = [p for p in curve if "train_loss" in p]
    a.plot([p["step"] for p in pts], [p["train_loss"] for p in pts], lw=1, label="train loss (LM)")
    ev = [p for p in curve if "held_out_ppl" in p]
    a.plot(
        [p["step"] for p in ev], [np.log(p["held_out_ppl"]) for p in ev], "o-", ms=3, label="held-out log perplexity"
    )
    a.set_xlabel("step")
    a.legend()
    a.set_title("training curve")
    layers = np.arange(len(doc["trained"]["cv"]))
    for name, off in (("trained", -0.2), ("untrained", 0.2)):
        b.bar(layers + off, doc[name]["topic_js_to_pool_bits"], width=0.4, label=name)
    if "band" in doc:
        b.axhspan(*doc["band"]["skew"], color="grey", alpha=0.2, label="real models' range")
    b.set_xticks(layers, [str(v) for v in layers])
    b.set_xlabel("MoE layer")
    b.set_ylabel("JS(category ‖ pool), bits")
    b.set_title("topic skew of expert choice")
    b.legend(fontsize=8)
    if "references" in doc:
        for name, r in (
            ("embedded model", doc["trained"]),
            *((r["model"].split(",")[0], r) for r in doc["references"].values()),
        ):
            g = r["one_topic_vs_mixed"]
            c.plot([x["tokens"] for x in g], [100 * x["gap"] for x in g], "o-", ms=3, label=name)
        c.set_xscale("log", base=2)
        c.set_xlabel("tokens in the batch (one per request)")
        c.set_ylabel("one topic vs mixed, distinct experts (%)")
        c.set_title("what grouping by topic saves")
        c.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out, pdf=False)


def predictor_figure(doc: dict, out: Path) -> list[Path]:
    """predictor.png: the learning table's recall as it serves, and per-layer recall of each table."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    curve = doc["learning_curve"]
    x = [c["requests"] for c in curve]
    a.plot(x, [c["learned"] for c in curve], "o-", ms=3, label="learning table (prequential)")
    a.plot(x, [c["dry_run"] for c in curve], "s-", ms=3, label="router dry run")
    a.axhline(np.mean(doc["token_recall"]["ceiling"]), color="k", ls="--", lw=1, label="token-id ceiling")
    a.axhline(doc["chance_recall"], color="grey", ls=":", lw=1, label="chance")
    a.set_xlabel("prompts served")
    a.set_ylabel("top-k recall, prompt tokens (mean over layers)")
    a.legend(fontsize=8)
    layers = np.arange(len(doc["moe_layers"]))
    for i, (key, label) in enumerate(
        (("dry_run", "dry run"), ("ceiling", "ceiling"), ("learned_final_in_sample", "learned (end)"))
    ):
        b.bar(layers + (i - 1) * 0.27, doc["token_recall"][key], width=0.27, label=label)
    b.axhline(doc["chance_recall"], color="grey", ls=":", lw=1)
    b.set_xticks(layers, [str(v) for v in doc["moe_layers"]])
    b.set_xlabel("MoE layer")
    b.set_ylabel("top-k recall")
    b.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, out, pdf=False)


def write_study(out: Path, stem: str, doc: dict, report: str, figure=None) -> None:
    """A study's results: STEM.json, STEM.md (the report, also printed) and its figure STEM.png/.pdf."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / f"{stem}.md").write_text(report)
    if figure is not None:
        figure(doc, out / stem)
    print(report)


def _save(fig, stem: Path, pdf: bool = True) -> list[Path]:
    paths = [stem.with_suffix(".png")] + ([stem.with_suffix(".pdf")] if pdf else [])
    for p in paths:
        fig.savefig(p, dpi=120)
    plt.close(fig)
    return paths


def twin_study_figure(study: dict, out: Path) -> list[Path]:
    """study.png: per admission cell, P99 ITL and TTFT against load for every arm; per dispatch
    cell, ITL P50 and TTFT P99 per policy."""
    cells = [(name, c, "admission") for name, c in study["admission"].items()] + [
        (name, c, "dispatch") for name, c in study["dispatch"].items()
    ]
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
    return _save(fig, out / "study", pdf=False)


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
    return _save(fig, out / "fidelity", pdf=False)
