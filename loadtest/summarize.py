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
    head = "| run | baseline E2E p99 (s) | ordered by CAPS | " + " | ".join(f"{c} ratio" for c, _ in FIGURES) + " |"
    lines = [head, "|" + "---|" * (3 + len(FIGURES))]
    ratios: list[list[float]] = [[] for _ in FIGURES]
    for p in paths:
        data = json.loads(Path(p).read_text())
        base, caps = data["runs"]
        row = []
        for i, (_, get) in enumerate(FIGURES):
            a, b = get(base), get(caps)
            r = b / a if a else None
            if r is not None:
                ratios[i].append(r)
            row.append("–" if r is None else f"{r:.3f}")
        ordered = caps["metrics"].get("vllm:caps_ranked_requests_total", 0)
        lines.append(f"| {Path(p).parent.name} | {base['summary']['e2e_s']['p99']:.3f} | {ordered:.0f} | "
                     + " | ".join(row) + " |")
    lines.append("| median | | | " + " | ".join(f"{statistics.median(r):.3f}" if r else "–" for r in ratios) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1:]), end="")
