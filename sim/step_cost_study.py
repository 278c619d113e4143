"""Where balancing helps and where affinity helps: the same sweep under three execution models.

    python -m sim.step_cost_study [--requests 600 --seeds 1 2 3 --out sim/results/step_cost]

Execution models (sim/execution.py): the prototype's CV curve, the step-cost model fitted to
measured kernel times on one device, and the same on 4 expert-parallel ranks (vLLM's linear
placement; each layer waits for its slowest rank). The models run at very different speeds,
so the arrival rates are set per model as fractions of its FCFS capacity (the throughput of
FCFS with every request waiting from the start). Per-token load vectors (the live default),
bursty and Poisson traffic, the prototype's weak topic hotspots (8 % of routing on a topic's
hot experts) and strong ones (50 %). Writes study.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from caps_vllm.strategies import make_strategy
from sim import workload as wlmod
from sim.engine import ServerConfig, simulate
from sim.evaluate import execution_model, sweep
from sim.metrics import summarize

MODELS = ("cv", "fitted", "expert_parallel")
STRATEGIES = ("fcfs", "greedy_dot_product", "greedy_variance", "step_cost")
LOADS = (0.7, 0.9, 1.2)  # arrival rate / FCFS capacity
HOT = (0.08, 0.5)


def capacity(model, wcfg: wlmod.WorkloadConfig, server: ServerConfig, requests: int, seed: int) -> float:
    """Requests/s FCFS sustains when the queue never runs dry (all arrive at once)."""
    rng = np.random.default_rng(seed)
    wl = wlmod.poisson(1e6, requests, wcfg, rng)
    vectors = wlmod.expert_vectors(wl, wcfg, rng)
    run = simulate(wl, vectors, make_strategy("fcfs"), server, model)
    return summarize(run)["throughput"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.step_cost_study", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default="sim/results/step_cost")
    a = ap.parse_args(argv)
    server = ServerConfig()
    cells = []
    for hot in HOT:
        wcfg = replace(wlmod.WorkloadConfig(), vectors="per_token", hot_share=hot)
        for kind in MODELS:
            model = execution_model(kind, wcfg)
            cap = capacity(model, wcfg, server, a.requests, a.seeds[0])
            rates = [round(rho * cap, 6) for rho in LOADS]
            doc = sweep(
                a.requests, a.seeds, rates, ["bursty", "poisson"], list(STRATEGIES), wcfg, server, model, jobs=a.jobs
            )
            for pattern in ("bursty", "poisson"):
                for rho, rate in zip(LOADS, rates):
                    cell = doc[pattern][f"{rate:g}"]
                    cells.append(
                        {
                            "hot_share": hot,
                            "model": kind,
                            "pattern": pattern,
                            "load": rho,
                            "rate": rate,
                            "capacity_rps": cap,
                            "results": {n: cell[n] for n in STRATEGIES},
                            "vs_fcfs": cell["_improvements"],
                        }
                    )
            print(f"hot_share {hot} {kind}: FCFS capacity {cap:.4g} req/s", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m sim.step_cost_study " + " ".join(sys.argv[1:] if argv is None else argv)
    (out / "study.json").write_text(
        json.dumps({"command": command, "requests": a.requests, "seeds": a.seeds, "cells": cells}, indent=2) + "\n"
    )
    text = report(cells, command, a)
    (out / "report.md").write_text(text)
    print(text)
    return 0


def report(cells: list[dict], command: str, a) -> str:
    others = [s for s in STRATEGIES if s != "fcfs"]
    lines = [
        "# Balancing vs affinity under three execution models (simulator)",
        "",
        f"Command: `{command}` ({a.requests} requests, seeds {a.seeds}, means over seeds).",
        "",
        "Each cell: throughput gain % / P99 latency reduction % against FCFS on the same workloads "
        "(positive is better). Load = arrival rate / FCFS capacity of that execution model.",
        "",
        "| hotspots | execution model | pattern | load | " + " | ".join(others) + " |",
        "|---" * (4 + len(others)) + "|",
    ]
    for c in cells:
        parts = [
            f"{c['vs_fcfs'][s]['throughput_gain_pct']:+.1f} / {c['vs_fcfs'][s]['p99_reduction_pct']:+.1f}"
            for s in others
        ]
        lines.append(
            f"| {c['hot_share']:g} | {c['model']} | {c['pattern']} | {c['load']:g} | " + " | ".join(parts) + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
