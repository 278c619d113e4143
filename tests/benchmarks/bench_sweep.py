"""Wall time of the prototype's full sweep (3000 requests, 4 seeds, 4 rates, 2 patterns,
every strategy), all cores, no figures: a printed figure, not a test (target <= 30 s).

    python tests/benchmarks/bench_sweep.py
"""

from __future__ import annotations

import os
import time

import sim  # noqa: F401  (first: single-threaded BLAS for the worker processes)
from caps_vllm.strategies import STRATEGIES
from sim.engine import ServerConfig
from sim.evaluate import sweep
from sim.execution import CVModel
from sim.workload import WorkloadConfig


def main() -> None:
    jobs = os.cpu_count() or 1
    t0 = time.perf_counter()
    sweep(
        3000,
        [42, 123, 456, 789],
        [150.0, 200.0, 250.0, 300.0],
        ["bursty", "poisson"],
        list(STRATEGIES),
        WorkloadConfig(),
        ServerConfig(),
        CVModel(),
        jobs=jobs,
    )
    wall = time.perf_counter() - t0
    runs = 2 * 4 * 4 * len(STRATEGIES)
    print(
        f"full sweep: {runs} runs x 3000 requests on {jobs} processes: {wall:.1f} s wall "
        f"({wall / runs * 1e3:.0f} ms per run); target <= 30 s -> {'met' if wall <= 30 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
