"""Dispatch across replicas in the regime map's deployments: the oracle's headroom over least-loaded.

:mod:`sim.dispatch_bound` bounds what one-topic replicas could save with no load cost at all;
this measures it with load: ``--replicas`` replicas of one deployment (stock vLLM scheduler in
each, each replica its own step model, so a cache's state is its own), mixed-topic Poisson
arrivals at ``--load`` x the replicas' capacity (``--replicas`` x one replica's FCFS offline
throughput, measured first), dispatched by

* ``least_loaded``: vLLM's rule (100 ms snapshots);
* ``expert_affinity``: CAPS's dispatcher scored on the prompt's routing, load guard 8 in flight;
* ``expert_affinity_oracle``: the same scored on the request's decode routing;
* ``expert_affinity_tpot``: CAPS's dispatcher with the TPOT objective (prompt routing), guard 8;
  ``expert_affinity_tpot_tight``: with the tight guard below;
* ``domain_oracle``: each topic to its home replica, same guard; ``domain_oracle_tight``: with a
  guard of a quarter of a replica's ``max_num_seqs`` (at least 1).

Per cell: TPOT (mean inter-token gap), output tokens/s, TTFT p99, distinct experts per decode
step, against least-loaded. The rule (issue 31): where the oracle's TPOT headroom is ≥ 5 % in a
realistic cell, a router is worth building. A model, like the map.

    python -m sim.dispatch_study --out sim/results/regime/dispatch   # make regime-map runs it
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from sim.deployments import build
from sim.regime_map import budgets, kv_bytes, load_model, run_arm, workload
from sim.step_time import VllmStepTime
from sim.twin import Deployment, Engine, build_scheduler

POLICIES = (
    "least_loaded",
    "expert_affinity",
    "expert_affinity_oracle",
    "expert_affinity_tpot",
    "expert_affinity_tpot_tight",
    "domain_oracle",
    "domain_oracle_tight",
)
CELLS = (("offload", "rtx4090"), ("cache-lru", "l4"), ("cpu-experts", "rtx4090"))


def run_policy(policy: str, reqs, routing, make_step, deployment: Deployment, model_dir: Path, replicas: int) -> dict:
    from vllm.v1.core.sched.scheduler import Scheduler

    from sim.cluster import Cluster, DomainOracle, ExpertAffinity, LeastLoaded
    from sim.twin_run import summarize

    steps = [make_step() for _ in range(replicas)]
    outputs = {r.rid: r.output_tokens for r in reqs}
    if policy == "least_loaded":
        dispatch = LeastLoaded(0.1)
    elif policy.startswith("domain_oracle"):
        margin = max(1, deployment.max_num_seqs // 4) if policy.endswith("_tight") else 8
        dispatch = DomainOracle(routing.domains, margin, 0.1)
    else:
        oracle = policy.endswith("_oracle")
        tight = max(1, deployment.max_num_seqs // 4)
        dispatch = ExpertAffinity(
            replicas,
            routing.layers * routing.experts,
            steps[0].moe,
            lambda r: routing.vector(r.rid, oracle, outputs[r.rid]),
            tight if policy.endswith("_tight") else 8,
            "tpot" if "_tpot" in policy else "step",
        )
    engines = [
        Engine(build_scheduler(str(model_dir), Scheduler, deployment), deployment.block_size, name=str(k))
        for k in range(replicas)
    ]
    timing = VllmStepTime(steps[0], routing)
    current = {}

    def batch(e, out):
        current["e"] = e
        return timing.batch(e.scheduler, out)

    cluster = Cluster(engines, dispatch, batch, price=lambda b: steps[int(current["e"].name)].seconds(b))
    t0 = time.perf_counter()
    cluster.run(reqs)
    s = summarize(cluster.result(), time.perf_counter() - t0)
    host = sum(st.host_bytes for st in steps) / max(1, sum(st.steps for st in steps))
    hits = [st.tallies()["cache_hit_rate"] for st in steps]
    return {
        "tpot_s": s["itl_s"]["mean"],
        "output_tok_s": s["output_tok_s"],
        "ttft_p99_s": s["ttft_s"]["p99"],
        "distinct_experts_per_decode_step": s["decode_step_distinct_experts"],
        "requests": s["requests"],
        "per_replica_requests": [len(e.served) for e in engines],
        "host_bytes_per_step": host,
        "cache_hit_rate": float(np.mean(hits)) if hits[0] is not None else None,
        "guard_overrides": getattr(dispatch, "overrides", None),
        "wall_s": s["wall_s"],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.dispatch_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["qwen3-30b-a3b", "deepseek-v2-lite"])
    ap.add_argument("--seqs", nargs="+", type=int, default=[8, 16, 32], help="max_num_seqs per replica")
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--load", type=float, default=0.9)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sim/results/regime/dispatch")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for model in a.models:
        m = load_model(model, a.seed)
        shape, vocab, routing, lengths, model_dir = m.shape, m.vocab, m.routing, m.lengths, m.dir
        cells = []
        for kind, card in CELLS:
            for seqs in a.seqs:
                kv = kv_bytes(shape, seqs)
                d = budgets(build(kind, card, shape, vocab, kv), shape, seqs, kv)
                t0 = time.perf_counter()
                one = workload(routing, "offline", 6 * seqs, 0.0, a.seed, lengths, vocab)
                fcfs = run_arm("fcfs", one, model_dir, build(kind, card, shape, vocab, kv), d, routing)
                capacity = len(one.requests) / fcfs["makespan_s"] * a.replicas
                w = workload(routing, "poisson", 6 * seqs * a.replicas, a.load * capacity, a.seed + 1, lengths, vocab)
                pol = {
                    p: run_policy(
                        p, w.requests, routing, lambda: build(kind, card, shape, vocab, kv), d, model_dir, a.replicas
                    )
                    for p in dict.fromkeys(("least_loaded", *a.policies))
                }
                base = pol["least_loaded"]["tpot_s"]
                cells.append(
                    {
                        "deployment": kind,
                        "card": card,
                        "model": model,
                        "max_num_seqs": seqs,
                        "replicas": a.replicas,
                        "load": a.load,
                        "rate_rps": a.load * capacity,
                        "policies": pol,
                    }
                )
                print(
                    f"{model} {kind}@{card} {a.replicas}x{seqs}: "
                    + ", ".join(f"{p} {pol[p]['tpot_s'] / base - 1:+.1%}" for p in pol if p != "least_loaded")
                    + f" TPOT vs least-loaded ({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
                routing.bound.clear()
        (out / f"{model}.json").write_text(json.dumps({"cells": cells}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
