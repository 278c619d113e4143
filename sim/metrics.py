"""Per-run figures: latency percentiles, throughput and expert-load imbalance."""

from __future__ import annotations

import numpy as np

from sim.engine import RunResult


def imbalance(loads: np.ndarray) -> np.ndarray:
    """max/mean of each load vector (1.0 is perfectly balanced); rows with no load are 1.0."""
    mean = loads.mean(axis=1)
    return np.where(mean > 0, loads.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)


def summarize(run: RunResult) -> dict[str, float]:
    """Latency percentiles in ms (interpolated, as the prototype's study reported them),
    throughput in req/s over the makespan, mean batch imbalance."""
    lat_ms = run.latency * 1000.0
    p50, p90, p99 = np.percentile(lat_ms, [50, 90, 99])
    makespan = float(run.completion.max() - run.workload.arrival.min())
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean_latency": float(lat_ms.mean()),
        "throughput": len(run.workload) / makespan if makespan > 0 else float("inf"),
        "imbalance": float(imbalance(run.batch_loads).mean()),
    }
