"""Strategy comparison sweep: every strategy on the same workloads, results.json and figures.

    python -m sim.evaluate --requests 3000 --seeds 42 123 456 789 --rates 150 200 250 300

Each (pattern, rate, seed) workload is generated once and served by every strategy, each
strategy seeded with the run's seed. Means and sample standard deviations over the seeds
go to results.json in the prototype's schema, with improvements over FCFS.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from caps_vllm.step_cost import PLACEMENTS, StepCostModel, expert_placement
from caps_vllm.strategies import STRATEGIES, make_strategy
from sim import workload as wlmod
from sim.engine import ServerConfig, simulate
from sim.execution import CVModel, ExecutionModel, StepModel
from sim.metrics import summarize

PATTERNS = ("bursty", "poisson", "trace")
EXECUTION = ("cv", "fitted", "expert_parallel")
METRICS = ("p50", "p90", "p99", "throughput", "imbalance")


def _run_cell(args: tuple) -> tuple[str, float, int, dict[str, dict[str, float]]]:
    """One workload, all strategies: the unit of parallel work."""
    pattern, rate, seed, n, strategies, wcfg, server, model, trace_path, deployment = args
    rng = np.random.default_rng(seed)
    if pattern == "trace":
        wl = wlmod.trace(trace_path, rate, n, wcfg, rng)
    else:
        wl = getattr(wlmod, pattern)(rate, n, wcfg, rng)
    vectors = wlmod.expert_vectors(wl, wcfg, rng)
    out = {
        name: summarize(simulate(wl, vectors, make_strategy(name, seed=seed, deployment=deployment), server, model))
        for name in strategies
    }
    return pattern, rate, seed, out


def _aggregate(runs: list[dict[str, float]]) -> dict[str, float]:
    agg = {}
    for m in METRICS:
        vals = np.array([r[m] for r in runs])
        agg[f"{m}_mean"] = round(float(vals.mean()), 3)
        agg[f"{m}_std"] = round(float(vals.std(ddof=1)) if vals.size > 1 else 0.0, 3)
    return agg


def improvements(cell: dict[str, dict[str, float]], baseline: str = "fcfs") -> dict[str, dict[str, float]]:
    """Per strategy, % better than the baseline: P99 and imbalance reduction, throughput gain."""
    base = cell[baseline]
    return {
        name: {
            "p99_reduction_pct": round(100.0 * (base["p99_mean"] - s["p99_mean"]) / base["p99_mean"], 1),
            "throughput_gain_pct": round(
                100.0 * (s["throughput_mean"] - base["throughput_mean"]) / base["throughput_mean"], 1
            ),
            "imbalance_reduction_pct": round(
                100.0 * (base["imbalance_mean"] - s["imbalance_mean"]) / base["imbalance_mean"], 1
            ),
        }
        for name, s in cell.items()
        if name != baseline
    }


def sweep(
    requests: int,
    seeds: list[int],
    rates: list[float],
    patterns: list[str],
    strategies: list[str],
    wcfg: wlmod.WorkloadConfig,
    server: ServerConfig,
    model: ExecutionModel,
    trace_path: str | None = None,
    jobs: int = 1,
    progress: bool = False,
    deployment: dict | None = None,
) -> dict:
    """Run the sweep and return the results document (the prototype's results.json schema).

    ``deployment`` tells deployment-aware strategies (step_cost) what the execution model
    is, as the live scheduler tells them what vLLM runs; by default it is read off ``model``.
    """
    if deployment is None:
        deployment = deployment_of(model, wcfg)
    for name in strategies:
        make_strategy(name, deployment=deployment)  # unknown names fail before any work starts
    if "trace" in patterns and not trace_path:
        raise ValueError("pattern 'trace' needs --trace PATH")
    todo = [
        (p, r, s, requests, strategies, wcfg, server, model, trace_path, deployment)
        for p in patterns
        for r in rates
        for s in seeds
    ]
    started = time.perf_counter()
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            done = _progress(pool.imap_unordered(_run_cell, todo), len(todo), progress)
            cells = list(done)
    else:
        cells = list(_progress(map(_run_cell, todo), len(todo), progress))
    doc: dict = {
        "config": {
            "requests": requests,
            "seeds": seeds,
            "rates": rates,
            "patterns": patterns,
            "workload": asdict(wcfg),
            "server": asdict(server),
            "execution": {"model": type(model).__name__, **asdict(model)},
            "trace": trace_path,
            "deployment": deployment,
            "generated": datetime.now().isoformat(timespec="seconds"),
            "wall_s": round(time.perf_counter() - started, 2),
        },
        "strategies": sorted(strategies),
    }
    for pattern in patterns:
        doc[pattern] = {}
        for rate in rates:
            per = {
                name: _aggregate([c[3][name] for c in cells if c[0] == pattern and c[1] == rate]) for name in strategies
            }
            cell = dict(sorted(per.items()))
            if "fcfs" in strategies:
                cell["_improvements"] = improvements(per)
            doc[pattern][f"{rate:g}"] = cell
    return doc


def execution_model(
    kind: str,
    wcfg: wlmod.WorkloadConfig,
    sensitivity: float = CVModel.sensitivity,
    ranks: int = 4,
    placement: str = "linear",
    shape: str | None = None,
) -> ExecutionModel:
    """The prototype's CV curve, or the step-cost model fitted to measured kernel times on one
    device ("fitted") or on ``ranks`` expert-parallel ranks ("expert_parallel")."""
    if kind == "cv":
        return replace(CVModel(), sensitivity=sensitivity)
    if kind not in EXECUTION:
        raise ValueError(f"execution model {kind!r}; valid: {', '.join(EXECUTION)}")
    where = tuple(expert_placement(wcfg.num_experts, ranks, placement).tolist()) if kind == "expert_parallel" else None
    return StepModel(StepCostModel.load(shape=shape), wcfg.num_experts, wcfg.vectors, placement=where)


def deployment_of(model: ExecutionModel, wcfg: wlmod.WorkloadConfig) -> dict:
    """Experts per layer and expert-parallel placement of an execution model."""
    placement = getattr(model, "placement", None)
    if placement is None:
        return {"experts": wcfg.num_experts, "ranks": 1}
    return {"experts": wcfg.num_experts, "ranks": max(placement) + 1, "placement": list(placement)}


def _progress(it, total: int, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, total=total, desc="workloads", unit="wl", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.evaluate", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=500, help="requests per workload")
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--rates", type=float, nargs="+", default=[200.0], help="arrival rates, req/s")
    ap.add_argument("--patterns", nargs="+", default=["bursty", "poisson"], choices=PATTERNS)
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES), help="strategy names (default: all)")
    ap.add_argument(
        "--trace", help="trace CSV for the 'trace' pattern (Azure or arrival_s,prompt_tokens,output_tokens)"
    )
    ap.add_argument("--vectors", choices=("counts", "per_token"), default="counts", help="request load vectors")
    ap.add_argument("--layers", type=int, default=1, help="MoE layers per vector (d = layers x 60)")
    ap.add_argument(
        "--hot-share",
        type=float,
        default=wlmod.WorkloadConfig.hot_share,
        help="share of a topic's routing on its hot experts (how strong the hotspots are)",
    )
    ap.add_argument(
        "--execution",
        choices=EXECUTION,
        default="cv",
        help="cv: the prototype's 1 + CV x sensitivity; fitted: measured step cost on one device; "
        "expert_parallel: the same per rank, each layer waits for its slowest rank",
    )
    ap.add_argument("--sensitivity", type=float, default=CVModel.sensitivity, help="CV sensitivity (--execution cv)")
    ap.add_argument("--ep-ranks", type=int, default=4, help="expert-parallel ranks (--execution expert_parallel)")
    ap.add_argument(
        "--placement", choices=PLACEMENTS, default="linear", help="expert placement over the ranks, as vLLM's"
    )
    ap.add_argument(
        "--cost-shape", help="which fitted layer shape in caps_vllm/data/step_cost.json (default: its default)"
    )

    ap.add_argument("--out", default="sim/results/latest", help="folder for results.json and figures")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.requests < 1 or any(r <= 0 for r in a.rates):
        ap.error("--requests and --rates must be positive")
    try:
        wcfg = replace(wlmod.WorkloadConfig(), vectors=a.vectors, layers=a.layers, hot_share=a.hot_share)
        model = execution_model(a.execution, wcfg, a.sensitivity, a.ep_ranks, a.placement, a.cost_shape)
        doc = sweep(
            a.requests,
            a.seeds,
            a.rates,
            a.patterns,
            a.strategies,
            wcfg,
            ServerConfig(),
            model,
            trace_path=a.trace,
            jobs=a.jobs,
            progress=not a.no_progress,
        )
    except ValueError as exc:
        ap.error(str(exc))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {out / 'results.json'} ({doc['config']['wall_s']} s)")
    if not a.no_figures:
        from sim.plots import write_figures

        for path in write_figures(doc, out):
            print(f"wrote {path}")
    print(table(doc))
    return 0


def table(doc: dict) -> str:
    """The prototype's summary table: per pattern and strategy, improvement ranges over rates."""
    lines = []
    for pattern in doc["config"]["patterns"]:
        cells = [doc[pattern][r] for r in doc[pattern]]
        if not cells or "_improvements" not in cells[0]:
            continue
        lines.append(
            f"\n{pattern}: strategy | P99 reduction | throughput gain | imbalance reduction (range over rates)"
        )
        rows = []
        for name in cells[0]["_improvements"]:
            rng = {k: [c["_improvements"][name][k] for c in cells] for k in cells[0]["_improvements"][name]}
            rows.append((max(rng["p99_reduction_pct"]), name, rng))
        for _, name, rng in sorted(rows, reverse=True):
            parts = [f"{min(v):+.1f}% to {max(v):+.1f}%" for v in rng.values()]
            lines.append(f"  {name:20s} " + " | ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
