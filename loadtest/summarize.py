"""Several side-by-side comparisons (their compare.json) in one markdown table: per compared arm
the key figures' ratios to the baseline with their 95 % intervals and verdicts.

    python -m loadtest.summarize loadtest/results/cpu-*/compare.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

FIGURES = (
    "TTFT p99",
    "ITL p50",
    "ITL p99",
    "E2E p50",
    "E2E p99",
    "output tokens/s",
    "actual distinct experts/layer/step",
)


def _cell(c: dict) -> str:
    if c["ratio"] is None:
        return "–"
    if c["lo"] is None:
        return f"{c['ratio']:.3f}"
    v = c["verdict"]
    short = (
        "n.s."
        if v.startswith("no significant difference")
        else "**A/A differs**"
        if v.startswith("A/A differs")
        else f"**{v}**"
        if v in ("better", "worse")
        else v.split(" (")[0]
    )
    return f"{c['ratio']:.2f} [{c['lo']:.2f}–{c['hi']:.2f}] {short}"


def table(paths: list[str]) -> str:
    """One row per (comparison, compared arm); the A/A control's row says "A/A"."""
    lines = [
        "| comparison | arm / baseline | valid pairs | " + " | ".join(FIGURES) + " |",
        "|" + "---|" * (3 + len(FIGURES)),
    ]
    for p in paths:
        doc = json.loads(Path(p).read_text())
        for arm, c in doc["comparisons"].items():
            name = f"{arm} / {doc['baseline']}" + (" (A/A)" if arm == doc.get("aa") else "")
            lines.append(
                f"| {Path(p).parent.name} | {name} | {c['E2E p99']['runs']} of {doc['args']['repeats']} | "
                + " | ".join(_cell(c[f]) for f in FIGURES)
                + " |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(sys.argv[1:]), end="")
