"""The most expert-aware dispatch across replicas could save, deployment by deployment (the twin's models).

vLLM's data-parallel front end sends a request to the least-loaded replica, so each replica's
decode batch is a mixed draw of topics. The best any dispatcher could do for the experts is to
give every replica one topic: a *domain oracle* with no load cost at all. This bounds that
headroom: per (deployment, model, decode batch of ``b`` running requests per replica), a
replica's steady decode step priced by the deployment's step model (:mod:`sim.deployments`;
the cache's state carried from step to step) with ``b`` tokens of mixed topics against ``b``
tokens of one topic, routing from :mod:`sim.topic_routing`. Where even this bound is under 5 %,
no router is worth building; where it is above, a router is a candidate and the twin's cluster
(:mod:`sim.cluster`) is the next measurement.

    python -m sim.dispatch_bound --out sim/results/regime/dispatch_bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from caps_vllm.routing import counts_from_rows
from sim.deployments import build
from sim.regime_map import DEPLOYMENTS, MODELS, kv_bytes, load_model, pick_step
from sim.step_time import StepBatch

BATCHES = (4, 8, 16, 32, 64)


def token_pool(routing, tokens: int = 4000) -> dict[str, np.ndarray]:
    """Per domain, decode-token routing rows [tokens, layers, k] to draw batches from."""
    if hasattr(routing, "replay"):  # recorded routing: every recorded token of the domain
        return {d: np.concatenate(routing.replay.seqs[d]) for d in routing.domains}
    pool = {}
    for i, d in enumerate(routing.domains):
        routing.bind(f"pool-{d}", d, 1, tokens, key=10_000 + i)
        pool[d] = routing.rows(f"pool-{d}", 1, tokens)
    return pool


def steady_step(step, pool: dict, b: int, home: str | None, steps: int, rng) -> tuple[float, float]:
    """Mean seconds and distinct experts per layer of a replica's decode step after a warm-up;
    the replica serves ``home``'s topic only, or (None) a mixed draw."""
    doms = list(pool)
    secs, distinct = [], []
    for s in range(steps):
        picks = [home] * b if home else [doms[int(i)] for i in rng.integers(len(doms), size=b)]
        rows = np.stack([pool[d][int(rng.integers(len(pool[d])))] for d in picks])
        counts = counts_from_rows(rows, step.shape.experts).astype(np.float64)
        t = step.seconds(StepBatch(b, b * 600, counts, decode_requests=b))
        if s >= steps // 4:  # a cache warms up first
            secs.append(t)
            distinct.append(float((counts > 0).sum(axis=1).mean()))
    return float(np.mean(secs)), float(np.mean(distinct))


def bound(models=MODELS, batches=BATCHES, steps: int = 200, seed: int = 0) -> list[dict]:
    rows = []
    for model in models:
        m = load_model(model, seed)
        shape, vocab = m.shape, m.vocab
        pool = token_pool(m.routing)
        for kind, cards in DEPLOYMENTS:
            for b in batches:
                step, _ = pick_step(kind, cards, m, kv_bytes(shape, b))
                if step is None:
                    continue
                out = {"deployment": kind, "card": step.card.name, "model": model, "batch": b}
                runs = {}
                for home in (None, *pool):  # mixed, then one replica per topic (each its own cache)
                    fresh = build(kind, step.card.name, shape, vocab, kv_bytes(shape, b))
                    runs[home] = steady_step(fresh, pool, b, home, steps, np.random.default_rng([seed, b]))
                out["mixed_s"], out["mixed_distinct"] = runs.pop(None)
                out["one_topic_s"], out["one_topic_distinct"] = (float(np.mean(v)) for v in zip(*runs.values()))
                out["headroom"] = 1.0 - out["one_topic_s"] / out["mixed_s"]
                rows.append(out)
                print(
                    f"{model} {kind}@{step.card.name} b={b}: one-topic replicas {-out['headroom']:+.1%} step time",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.dispatch_bound", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="sim/results/regime/dispatch_bound.json")
    a = ap.parse_args(argv)
    rows = bound(a.models, steps=a.steps)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"bound": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
