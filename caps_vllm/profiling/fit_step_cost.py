"""Fit the step-cost model to measured MoE-layer times; report held-out error; plot it.

    caps-vllm fit-step-cost --csv moe_kernel.csv [--out step_cost.json]

Both forms of :class:`caps_vllm.step_cost.StepCostModel` are fitted per layer shape on the
"equal" rows of caps-vllm profile-moe (a ladder from fully concentrated to fully spread, per
number of tokens) and tested on the rows it never saw: the Zipf and Dirichlet routings,
whose per-expert counts are uneven. The fit minimises squared *relative* error, so 1-token
steps weigh as much as 2048-token ones. Writes the fits with their errors to
``--out`` (``make fit-step-cost`` writes the shipped ``caps_vllm/data/step_cost.json``, what the
strategy and the simulator load; a user passes the printed coefficients as
``strategy_params.cost``), a report and (with matplotlib) a figure next to the CSV.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from caps_vllm.step_cost import FORMS, StepCostModel

#: the layer the product's defaults are fitted for (Qwen1.5-MoE-A2.7B's)
DEFAULT_SHAPE = "qwen1.5-moe"
#: break-even tokens per expert tried by the roofline fit (weight_ms / token_ms)
BREAK_EVEN = np.geomspace(0.05, 200.0, 400)


def read(path: Path) -> dict[str, list[dict]]:
    """Rows per shape, with ``counts`` as an int array and ``ms`` the median time."""
    shapes: dict[str, list[dict]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            if not row.get("counts"):
                raise ValueError(f"{path}: rows without per-expert counts; re-measure with caps-vllm profile-moe")
            counts = np.array(row["counts"].split(), dtype=np.int64)
            shapes.setdefault(row["shape"], []).append(
                {
                    "pattern": row["pattern"],
                    "tokens": int(row["tokens"]),
                    "counts": counts,
                    "ms": float(row["median_ms"]),
                }
            )
    return shapes


def _relative_lstsq(features: np.ndarray, ms: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative coefficients minimising sum((features @ x - ms) / ms)^2 (tiny problem:
    drop the most negative coefficient until none is left)."""
    a = features / ms[:, None]
    active = list(range(features.shape[1]))
    while True:
        x = np.zeros(features.shape[1])
        x[active] = np.linalg.lstsq(a[:, active], np.ones(len(ms)), rcond=None)[0]
        if (x >= 0).all():
            return x, float(np.sum((features @ x / ms - 1.0) ** 2))
        active.remove(int(np.argmin(x)))


def fit(rows: list[dict], form: str) -> StepCostModel:
    counts = np.stack([r["counts"] for r in rows]).astype(np.float64)
    ms = np.array([r["ms"] for r in rows])
    ones = np.ones(len(rows))
    distinct = (counts > 0).sum(axis=1)
    if form == "linear":
        x, _ = _relative_lstsq(np.column_stack([ones, distinct, counts.sum(axis=1)]), ms)
        return StepCostModel(float(x[0]), float(x[1]), float(x[2]), "linear")
    best = None
    for n in BREAK_EVEN:  # for a fixed break-even point the roofline is linear in (fixed, weight)
        x, err = _relative_lstsq(np.column_stack([ones, np.maximum(counts > 0, counts / n).sum(axis=1)]), ms)
        if best is None or err < best[0]:
            best = (err, float(x[0]), float(x[1]), float(x[1] / n))
    return StepCostModel(best[1], best[2], best[3], "roofline")


def predict(model: StepCostModel, rows: list[dict]) -> np.ndarray:
    return np.array([float(model.layer_ms(r["counts"])) for r in rows])


def errors(model: StepCostModel, rows: list[dict]) -> dict[str, float]:
    """Relative errors in %: mean absolute, 90th percentile, max; also for steps <= 64 tokens."""
    ms = np.array([r["ms"] for r in rows])
    rel = np.abs(predict(model, rows) / ms - 1.0) * 100.0
    small = np.array([r["tokens"] <= 64 for r in rows])
    out = {"n": len(rows), "mape": rel.mean(), "p90": np.percentile(rel, 90), "max": rel.max()}
    if small.any():
        out["mape_le64_tokens"] = rel[small].mean()
    return {k: round(float(v), 1) if k != "n" else int(v) for k, v in out.items()}


def plot(results: dict, shapes: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], shapes.items()):
        ms = np.array([r["ms"] for r in rows])
        held = np.array([r["pattern"] != "equal" for r in rows])
        for form, marker in zip(FORMS, "ox"):
            model = StepCostModel(**results[name][form]["model"])
            pred = predict(model, rows)
            err = results[name][form]["held_out"]["mape"]
            ax.scatter(ms[~held], pred[~held], marker=marker, s=18, alpha=0.5, label=f"{form}, fitted rows")
            ax.scatter(ms[held], pred[held], marker=marker, s=30, label=f"{form}, held out (mean |err| {err}%)")
        lo, hi = ms.min() * 0.8, ms.max() * 1.2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="measured ms", ylabel="model ms", title=f"MoE layer, {name}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: dict, csv_path: Path) -> str:
    lines = [
        "# Step-cost fit",
        "",
        f"Measurements: `{csv_path}` (machine in the `.machine.txt` beside it). Re-run: "
        "`make bench-moe` (measure, ~6 min on the machine above) then `make fit-step-cost`.",
        "Fitted on the equal-load ladder; held out: Zipf and Dirichlet routings (uneven counts). "
        "Errors are |model/measured - 1| in %.",
        "",
        "| shape | form | fixed ms | weight ms/expert | token ms/assignment | break-even tokens/expert "
        "| fitted mean err | held-out mean err | held-out p90 | held-out max | held-out mean err, <=64 tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_form in results.items():
        for form, r in per_form.items():
            m, h, t = r["model"], r["held_out"], r["fitted"]
            even = m["weight_ms"] / m["token_ms"] if m["token_ms"] > 0 else float("inf")
            lines.append(
                f"| {name} | {form} | {m['fixed_ms']:.3f} | {m['weight_ms']:.3f} | {m['token_ms']:.4f} | {even:.1f} "
                f"| {t['mape']}% | {h['mape']}% | {h['p90']}% | {h['max']}% | {h.get('mape_le64_tokens', '-')}% |"
            )
    return "\n".join(lines) + "\n"


def spread_penalty(shapes: dict[str, list[dict]]) -> list[str]:
    """Measured regime: per token count, time with the most distinct experts over the fastest
    equal-load spread (> 1: spreading tokens over more experts costs)."""
    lines = [
        "",
        "Measured spread penalty (equal loads): time at the most distinct experts / the fastest spread.",
        "",
        "| shape | "
        + " | ".join(f"{t} tok" for t in sorted({r["tokens"] for rows in shapes.values() for r in rows}))
        + " |",
    ]
    lines.append("|---" * (len(lines[-1].split("|")) - 2) + "|")
    for name, rows in shapes.items():
        cells = []
        for t in sorted({r["tokens"] for r in rows}):
            eq = [r for r in rows if r["tokens"] == t and r["pattern"] == "equal"]
            most = max(eq, key=lambda r: (r["counts"] > 0).sum())
            cells.append(f"{most['ms'] / min(r['ms'] for r in eq):.2f}" if len(eq) > 1 else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="caps-vllm fit-step-cost", description=__doc__.split("\n")[0])
    ap.add_argument("--csv", default="moe_kernel.csv", help="timings from caps-vllm profile-moe")
    ap.add_argument("--out", help="fits (JSON); default: step_cost.json beside the CSV")
    a = ap.parse_args(argv)
    csv_path = Path(a.csv)
    out = Path(a.out) if a.out else csv_path.with_name("step_cost.json")
    shapes = read(csv_path)
    results: dict = {}
    for name, rows in shapes.items():
        train = [r for r in rows if r["pattern"] == "equal"]
        held = [r for r in rows if r["pattern"] != "equal"]
        results[name] = {}
        for form in FORMS:
            model = fit(train, form)
            results[name][form] = {
                "model": model.as_dict(),
                "fitted": errors(model, train),
                "held_out": errors(model, held),
            }
    # The product uses the form with the lower held-out error on the default shape.
    best = {name: min(FORMS, key=lambda f: results[name][f]["held_out"]["mape"]) for name in results}
    doc = {
        "source": str(csv_path),
        "default": DEFAULT_SHAPE if DEFAULT_SHAPE in results else next(iter(results)),
        "fits": {name: results[name][best[name]]["model"] for name in results},
        "errors": results,
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    md = report(results, csv_path) + "\n".join(spread_penalty(shapes)) + "\n"
    csv_path.with_name("step_cost_fit.md").write_text(md)
    wrote = [out, csv_path.with_name("step_cost_fit.md")]
    try:
        plot(results, shapes, csv_path.with_name("step_cost_fit.png"))
        wrote.append(csv_path.with_name("step_cost_fit.png"))
    except ImportError:
        print("no figure: matplotlib is not installed (pip install matplotlib)")
    print(md)
    print(f"strategy_params for this machine: {json.dumps({'cost': doc['fits'][doc['default']]})}")
    print("wrote " + ", ".join(map(str, wrote)))


if __name__ == "__main__":
    main()
