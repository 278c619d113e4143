"""The regime map: where expert-aware admission pays, deployment by deployment (the twin).

For every (deployment x model x ``max_num_seqs`` x traffic) cell, vLLM's own scheduler on the
twin's virtual clock (:mod:`sim.twin`) serves the same requests three ways:

* ``fcfs``: vLLM's ``Scheduler`` as shipped;
* ``caps``: ``caps_vllm.CapsScheduler`` with ``step_cost`` priced by the deployment's own cost
  per distinct expert (:mod:`sim.deployments`), told each request's *prompt* routing (the best
  a predictor can be told), with the rules CAPS ships for the pattern (offline batch or online);
* ``oracle``: the same, told each request's *decode* routing (what no predictor knows in
  advance), every gain taken, no starvation bound in the way: the headroom.

Steps are priced by the deployment's step model (offloaded experts over PCIe, a GPU expert
cache, experts on the CPU, or all in HBM; sized to what the card holds at that concurrency);
routing is the real DeepSeek-V2-Lite-layout trace for that shape and per-token draws from the
OLMoE statistics for the others (:mod:`sim.topic_routing`). Traffic: an offline batch, mixed-
topic Poisson at 0.5 / 0.9 / 1.2 x capacity (FCFS's offline throughput), topic runs (bursty) and
the Azure conversation trace's arrivals at 0.9 x. Everything is a model: say so with any figure.

    python -m sim.regime_map --models qwen3-30b-a3b --out sim/results/regime   # one part
    python -m sim.regime_map --report --out sim/results/regime                  # merge, figure
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sim.deployments import GIB, build
from sim.regime_report import _p, rel
from sim.step_time import ModelShape, VllmStepTime
from sim.twin import HARDWARE_DEFAULTS, Deployment, Twin, TwinRequest, VectorSpace, build_scheduler, with_vectors

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MODELS = ("deepseek-v2-lite", "qwen1.5-moe-a2.7b", "qwen3-30b-a3b", "olmoe-1b-7b", "deepseek-v3-like")
#: (kind, cards in order of preference: the first on which the model needs that deployment)
DEPLOYMENTS = (
    ("hbm", ("h100-pcie",)),
    ("offload", ("rtx4090", "h100-pcie")),
    ("cache-lru", ("l4", "h100-pcie")),
    ("cache-lfru", ("l4", "h100-pcie")),
    ("cpu-experts", ("rtx4090", "h100-pcie")),
)
SEQS = (4, 8, 16, 32, 64, 256)
TRAFFIC = (("offline", 0.0), ("poisson", 0.5), ("poisson", 0.9), ("poisson", 1.2), ("bursty", 0.9), ("azure", 0.9))
OUTPUT = (32, 256)  # output tokens, uniform
MAX_MODEL_LEN = 4096
#: CAPS's shipped rules (docs/configuration.md): an offline batch, and an online server
RULES = {
    "offline": {"min_gain": 0.0, "window_size": 128, "max_passes": 1000},
    "online": {"min_gain": 0.02, "window_size": 32, "max_passes": 2},
}
ORACLE = {"min_gain": 0.0, "window_size": 4096, "max_passes": 1000}
ARMS = ("fcfs", "caps", "oracle")


@dataclass
class MapModel:
    """One model shape as every study here reads it: its config, shape, routing and prompt lengths."""

    name: str
    dir: Path
    shape: ModelShape
    vocab: int
    routing: object
    lengths: dict[str, np.ndarray] | None  # None: the routing gives each request its prompt length


def load_model(name: str, seed: int) -> MapModel:
    model_dir = ROOT / "sim" / "models" / name
    shape = ModelShape.from_config(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    routing = routing_for(name, shape, seed)
    lengths = None if name == "deepseek-v2-lite" else prompt_lengths(routing.domains)
    return MapModel(name, model_dir, shape, vocab, routing, lengths)


def pick_step(kind: str, cards, m: MapModel, kv: float):
    """The step model of ``kind`` on the first of ``cards`` where ``m`` runs and needs it (an
    offload of nothing is the hbm row), and the refusals met on the way."""
    refusals = []
    for card in cards:
        try:
            step = build(kind, card, m.shape, m.vocab, kv)
        except ValueError as exc:
            refusals.append(str(exc))
            continue
        if getattr(step, "offload_share", 1.0) == 0.0:
            refusals.append(f"{m.name} fits on {card}: nothing to offload (the hbm row applies)")
            continue
        return step, refusals
    return None, refusals


def budgets(step, shape: ModelShape, seqs: int, kv: float) -> Deployment:
    """vLLM's budgets for the card (its token budget by memory class), KV blocks from ``kv``."""
    hw = "h100" if step.card.memory >= 70e9 else "gpu"
    blocks = max(1, int(kv // (shape.kv_bytes_per_token * 16)))
    return Deployment(seqs, HARDWARE_DEFAULTS[hw][1], blocks, max_model_len=MAX_MODEL_LEN)


def routing_for(model: str, shape: ModelShape, seed: int):
    from sim.topic_routing import EsftRequests, TopicTokens

    if model == "deepseek-v2-lite":
        return EsftRequests(SHARED / "routing" / "esft_routing.npz", seed)
    return TopicTokens(
        SHARED / "routing" / "olmoe_routing_stats.npz", len(shape.moe_layers), shape.experts, shape.top_k, seed
    )


def prompt_lengths(domains: list[str]) -> dict[str, np.ndarray]:
    """Token lengths of the shipped real prompts per OLMoE domain (about 1.3 tokens a word)."""
    from loadtest.workload import load_prompts
    from sim.topic_routing import OLMOE_DOMAIN

    by: dict[str, list[int]] = {d: [] for d in domains}
    for row in load_prompts():
        d = OLMOE_DOMAIN.get(row["category"], "book")
        if d in by:
            by[d].append(max(4, round(1.3 * len(row["prompt"].split()))))
    return {d: np.minimum(np.array(v), 1024) for d, v in by.items() if v}


@dataclass
class Workload:
    requests: list[TwinRequest]
    pattern: str  # offline / online


def workload(routing, traffic: str, n: int, rate: float, seed: int, lengths, vocab: int) -> Workload:
    """``n`` requests of ``traffic`` at ``rate`` req/s, their routing bound (seeded: every arm
    sees the same arrivals, lengths, topics and routing)."""
    from loadtest.workload import topic_runs

    rng = np.random.default_rng([seed, n, len(traffic)])
    doms = routing.domains
    outs = rng.integers(OUTPUT[0], OUTPUT[1] + 1, size=n)
    if traffic == "offline":
        t = np.arange(n) * 1e-6  # queued in send order (CAPS's bound counts passes by younger requests)
    elif traffic == "azure":
        from loadtest.traces import load_trace

        tr = load_trace(SHARED / "traces" / "azure_llm_2023_conv.csv")
        k = min(n, len(tr.arrival_s))
        t = tr.arrival_s[:k].astype(float)
        t = t * (k / rate) / max(t[-1], 1e-9)  # its own burstiness, at the cell's mean rate
        outs[:k] = np.clip(tr.output_tokens[:k], OUTPUT[0], OUTPUT[1])
        n = k
    else:
        gaps = rng.exponential(1.0 / rate, n)
        t = np.cumsum(gaps) - gaps[0]
    topic = topic_runs(n, len(doms), 16.0, rng) if traffic == "bursty" else rng.integers(len(doms), size=n)
    reqs = []
    for i in range(n):
        d = doms[int(topic[i])]
        key = seed * 1_000_003 + i
        p = routing.prompt_len(d, key) if lengths is None else int(rng.choice(lengths[d]))
        out = int(outs[i])
        rid = f"r{i:05d}"
        routing.bind(rid, d, p, out, key)
        reqs.append(TwinRequest(rid, float(t[i]), rng.integers(1, vocab, size=p).tolist(), out, d))
    return Workload(reqs, "offline" if traffic == "offline" else "online")


def run_arm(
    arm: str, w: Workload, model_dir: Path, step, deployment: Deployment, routing, extra: dict | None = None
) -> dict:
    """One arm over the workload on a fresh scheduler and a fresh step model. ``extra``: further
    CAPS arms by name, each CAPS's rules (told the prompt routing) with these settings over them."""
    from vllm.v1.core.sched.scheduler import Scheduler

    from caps_vllm.scheduler import CapsScheduler
    from sim.twin_run import summarize

    outputs = {r.rid: r.output_tokens for r in w.requests}
    if arm == "fcfs":
        cls, caps = Scheduler, None
    else:
        cls = with_vectors(CapsScheduler, VectorSpace(routing.layers, routing.experts, routing.top_k))
        rules = ORACLE if arm == "oracle" else {**RULES[w.pattern], **(extra or {}).get(arm, {})}
        caps = {"metrics": False, "strategy": "step_cost", "strategy_params": {"cost": step.moe.as_dict()}, **rules}

    def on_arrival(r: TwinRequest, req) -> None:
        if arm != "fcfs":
            req.caps_vector = routing.vector(r.rid, arm == "oracle", outputs[r.rid])

    sched = build_scheduler(str(model_dir), cls, deployment, caps=caps)
    t0 = time.perf_counter()
    res = Twin(sched, VllmStepTime(step, routing), deployment.block_size, on_arrival=on_arrival).run(w.requests)
    s = summarize(res, time.perf_counter() - t0)
    served = res.served.values()
    out = {
        "tpot_s": s["itl_s"]["mean"],
        "output_tok_s": s["output_tok_s"],
        "ttft_p99_s": s["ttft_s"]["p99"],
        "makespan_s": max(x.finished_s for x in served) - min(x.arrival_s for x in served),
        "distinct_experts_per_decode_step": s["decode_step_distinct_experts"],
        "mean_running": s["queue"]["mean_running"],
        "mean_waiting": s["queue"]["mean_waiting"],
        "requests": s["requests"],
        "steps": s["steps"],
        "wall_s": s["wall_s"],
        **step.tallies(),
    }
    if arm != "fcfs":
        st = sched.caps.planner.stats
        out["caps"] = {k: getattr(st, k) for k in ("engaged", "plans", "reordered", "kept_fcfs", "pinned")}
    return out


def requests_for(seqs: int) -> int:
    return int(np.clip(6 * seqs, 96, 512))


def kv_bytes(shape: ModelShape, seqs: int) -> float:
    """KV memory for ``seqs`` requests at a mean context of 600 tokens (at least 1 GiB)."""
    return max(GIB, seqs * 600 * shape.kv_bytes_per_token)


def run_model(
    model: str,
    seqs_list,
    traffic,
    seed: int,
    out: Path,
    log=print,
    kinds=None,
    requests: int | None = None,
    extra: dict | None = None,
) -> dict:
    m = load_model(model, seed)
    shape, vocab, routing = m.shape, m.vocab, m.routing
    doc = {"model": model, "routing": type(routing).__name__, "cells": []}
    for kind, cards in DEPLOYMENTS:
        if kinds is not None and kind not in kinds:
            continue
        for seqs in seqs_list:
            kv = kv_bytes(shape, seqs)
            step, refusals = pick_step(kind, cards, m, kv)
            base = {"deployment": kind, "model": model, "max_num_seqs": seqs}
            if step is None:
                doc["cells"].append({**base, "refused": refusals})
                log(f"{model} {kind} seqs={seqs}: not priced ({refusals[-1]})")
                continue
            d = budgets(step, shape, seqs, kv)
            n = requests or requests_for(seqs)
            capacity = None
            for pattern, load in traffic:
                t0 = time.perf_counter()
                if pattern != "offline" and capacity is None:
                    continue  # capacity comes from the offline cell
                rate = 0.0 if pattern == "offline" else load * capacity
                w = workload(routing, pattern, n, rate, seed, m.lengths, vocab)
                arms = {}
                for arm in (*ARMS, *(extra or {})):
                    fresh = build(kind, step.card.name, shape, vocab, kv)
                    arms[arm] = run_arm(arm, w, m.dir, fresh, d, routing, extra)
                if pattern == "offline":
                    capacity = len(w.requests) / arms["fcfs"]["makespan_s"]
                cell = {
                    **base,
                    "traffic": pattern,
                    "load": load,
                    "rate_rps": rate,
                    "capacity_rps": capacity,
                    "requests": len(w.requests),
                    "step_model": step.describe(),
                    "arms": arms,
                }
                doc["cells"].append(cell)
                log(
                    f"{model} {kind}@{step.card.name} seqs={seqs} {pattern}@{load}: oracle TPOT "
                    f"{_p(rel(arms, 'oracle', 'tpot_s'))}, caps {_p(rel(arms, 'caps', 'tpot_s'))} "
                    f"({time.perf_counter() - t0:.0f} s)"
                )
            routing.bound.clear()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{model}.json").write_text(json.dumps(doc, indent=1, default=float))
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.regime_map", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--seqs", nargs="+", type=int, default=list(SEQS))
    ap.add_argument("--traffic", nargs="+", default=[f"{p}@{x:g}" for p, x in TRAFFIC], help="pattern@load")
    ap.add_argument("--kinds", nargs="+", choices=[k for k, _ in DEPLOYMENTS], help="default: every deployment")
    ap.add_argument(
        "--extra-arms",
        default="{}",
        help='further CAPS arms, JSON {"name": {caps settings over the shipped rules}}, e.g. '
        '\'{"caps-eager": {"min_gain": 0}}\'',
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true", help="merge the parts in --out into map.json, report.md, figure")
    ap.add_argument("--out", default="sim/results/regime")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if a.report:
        from sim.regime_report import write

        write(out)
        return 0
    traffic = []
    for t in a.traffic:
        p, _, x = t.partition("@")
        if p not in ("offline", "poisson", "bursty", "azure"):
            ap.error(f"--traffic {t!r}: pattern offline, poisson, bursty or azure")
        traffic.append((p, float(x or 0)))
    if traffic[0][0] != "offline":
        ap.error("--traffic: the offline batch comes first (it gives the capacity the loads scale)")
    extra = json.loads(a.extra_arms)
    if not isinstance(extra, dict) or any(k in ARMS or not isinstance(v, dict) for k, v in extra.items()):
        ap.error(f"--extra-arms: a JSON object of new arm names ({', '.join(ARMS)} taken) to CAPS settings")
    for m in a.models:
        log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
        run_model(m, a.seqs, traffic, a.seed, out, log=log, kinds=a.kinds, extra=extra)
    return 0


if __name__ == "__main__":
    sys.exit(main())
