"""Several side-by-side runs (compare.json) in one markdown table: per run the CAPS/baseline ratio
of the key figures, then their median.

    python -m loadtest.summarize loadtest/results/cpu-tiny-bursty-seed*/compare.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

FIGURES = [  # (column, getter)
    ("TTFT p99", lambda r: r["summary"]["ttft_s"]["p99"]),
    ("ITL p99", lambda r: r["summary"]["itl_s"]["p99"]),
    ("E2E p50", lambda r: r["summary"]["e2e_s"]["p50"]),
    ("E2E p99", lambda r: r["summary"]["e2e_s"]["p99"]),
    ("tok/s", lambda r: r["summary"]["throughput_tok_s"]),
    ("goodput", lambda r: r["summary"]["goodput_rps"]),
    ("imbalance max/mean", lambda r: r["metrics"]["vllm:caps_actual_load_max_over_mean"]),
    ("distinct experts", lambda r: r["metrics"]["vllm:caps_actual_distinct_experts"]),
]


def table(paths: list[str]) -> str:
    """One row per compared run (each run after a file's first, its baseline), then the median
    ratio per run label (a label is "caps" or a strategy name)."""
    head = "| run | baseline E2E p99 (s) | ordered by CAPS | " + " | ".join(f"{c} ratio" for c, _ in FIGURES) + " |"
    lines = [head, "|" + "---|" * (3 + len(FIGURES))]
    ratios: dict[str, list[list[float]]] = {}
    for p in paths:
        data = json.loads(Path(p).read_text())
        base, *others = data["runs"]
        for run in others:
            row = []
            per = ratios.setdefault(run["label"], [[] for _ in FIGURES])
            for i, (_, get) in enumerate(FIGURES):
                a, b = get(base), get(run)
                r = b / a if a else None
                if r is not None:
                    per[i].append(r)
                row.append("–" if r is None else f"{r:.3f}")
            ordered = run["metrics"].get("vllm:caps_ranked_requests_total", 0)
            name = Path(p).parent.name + ("" if len(others) == 1 else f": {run['label']}")
            lines.append(f"| {name} | {base['summary']['e2e_s']['p99']:.3f} | {ordered:.0f} | " + " | ".join(row) + " |")
    for label, per in ratios.items():
        name = "median" if len(ratios) == 1 else f"median {label}"
        lines.append(f"| {name} | | | " + " | ".join(f"{statistics.median(r):.3f}" if r else "–" for r in per) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1:]), end="")
