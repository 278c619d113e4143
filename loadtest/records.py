"""One live run's record as the side-by-side runner keeps it, and what is read off it.

A record: ``label`` (the arm), ``repeat``, ``seed``, ``status`` (ok / invalid / failed) with its
``reason``, ``summary`` (the Locust summary), ``metrics`` (what /metrics moved during the run),
and in memory only ``samples`` (one dict per request) and ``timeseries`` (the scrapes).
"""

from __future__ import annotations

import json
from pathlib import Path

from loadtest.stats import RunData


def mean_between(first: dict, last: dict, name: str) -> float | None:
    """Mean of a histogram's observations between two scrapes (``name_sum``/``name_count``)."""
    n = last.get(f"{name}_count", 0.0) - first.get(f"{name}_count", 0.0)
    return (last.get(f"{name}_sum", 0.0) - first.get(f"{name}_sum", 0.0)) / n if n > 0 else None


def classify(summary: dict, max_lag: float) -> tuple[str, str | None]:
    """ok, or why a finished run cannot enter a verdict."""
    if summary["completed"] == 0:
        return "failed", "no request completed"
    if summary.get("hold", {}).get("error"):
        return "failed", summary["hold"]["error"]
    lag = summary["lag_s"]["p99"]
    if lag is not None and lag > max_lag:
        return "invalid", f"load generator behind its schedule: P99 lag {lag:.3f} s > --max-lag {max_lag:g} s"
    return "ok", None


def read_samples(path: Path) -> list[dict]:
    """The per-request samples Locust wrote (``--samples``: one JSON object a line)."""
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def run_data(runs: list[dict]) -> dict[tuple[int, str], RunData]:
    """What the intervals and the pooled figures read of every valid run, by (repetition, arm)."""
    return {
        (r["repeat"], r["label"]): RunData.from_samples(r["samples"], run_level(r)) for r in runs if r["status"] == "ok"
    }


def run_level(rec: dict) -> dict[str, float | None]:
    """The run-level figures of a finished run (keys of loadtest.stats.FIGURES)."""
    s, m = rec["summary"], rec["metrics"]
    return {
        "throughput_rps": s["throughput_rps"],
        "throughput_tok_s": s["throughput_tok_s"],
        "goodput_rps": s["goodput_rps"],
        "makespan_s": s.get("makespan_s"),
        "engine_steps": m["engine_steps"] or None,
        "distinct_experts": m["vllm:caps_actual_distinct_experts"],
        "imbalance": m["vllm:caps_actual_load_max_over_mean"],
    }
