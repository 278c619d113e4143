"""Where expert reads cost: CAPS's rules chosen in the twin of the live CPU server, before any live run.

The twin of ``vllm serve`` on the real-cost model (:mod:`caps_vllm.real_cost`: the tiny model's
routing at Qwen1.5-MoE-A2.7B's expert size) on this CPU (:mod:`sim.cpu_twin`: vLLM's own scheduler,
steps priced by the ``cpu`` profile fitted on the live engine's step logs, the model's own prompt
and greedy-continuation routing). Cells: ``max_num_seqs`` 4, 8, 16, 32 x (a) mixed-topic Poisson
arrivals at ``--load`` x FCFS's capacity (its offline throughput in the twin) and (b) an offline
batch. Arms:

* ``fcfs``: vLLM's order;
* CAPS (``step_cost``) with each candidate rule set (``min_gain``, ``max_passes``, ``window_size``),
  pricing steps with ``--cost`` (the ``profile-moe`` fit at the server's thread count);
* the **oracle**: CAPS handed each request's true decode routing (what it will route to, per
  token, which no predictor knows in advance), window 4096, every predicted gain taken.

Per cell and arm: TPOT (mean inter-token gap), output tokens/s, makespan (offline), TTFT
P50/P99, E2E P99 and distinct experts per decode step, each the mean over ``--seeds``
(deterministic runs: no interval; the arms share every seed's arrivals). The rules chosen, per
traffic pattern (an offline batch's user sets them apart from an online server's): the candidate
with the best mean TPOT gain over that pattern's cells among those never more than 0.5 %
throughput or 10 % TTFT P99 (online traffic) worse than FCFS in any of them.

    python -m sim.cpu_study --profile sim/profiles/cpu-real-cost.json \\
        --patterns poisson --out sim/results/cpu                                  # make cpu-study
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

SEQS = (4, 8, 16, 32)
FIGS = ("tpot", "tok_s", "makespan", "ttft_p50", "ttft_p99", "e2e_p99", "distinct_decode")
#: the oracle: true decode routing, every predicted gain taken, no starvation bound in the way
ORACLE = {"min_gain": 0.0, "window_size": 4096, "max_passes": 1000}


def candidates(min_gains, max_passes, windows) -> dict[str, dict]:
    return {
        f"caps g{g:g} p{p} w{w}": {"min_gain": g, "max_passes": p, "window_size": w}
        for g, p, w in itertools.product(min_gains, max_passes, windows)
    }


def workload(a, pattern: str, seqs: int, rate: float) -> dict:
    """A load test's options (as ``loadtest.compare`` records them) for one cell."""
    return {
        "pattern": pattern,
        "prompts": a.prompts,
        "rate": rate,
        "duration": a.duration,
        "max_requests": a.batch if pattern == "offline" else 100000,
        "max_tokens": a.max_tokens,
        "min_tokens": a.min_tokens,
        "burst_len": 16.0,
        "chat_share": a.chat_share,
        "trace": "",
        "speedup": 1.0,
        "hold": 10.0 if pattern == "offline" else 0.0,
        "max_num_seqs": seqs,
        "max_model_len": 1024,
        "caps_config": json.dumps({"strategy_params": {"cost": a.cost}} if a.cost else {}),
        "model": a.model,
        "serve_arg": [],
    }


def mean_figs(runs: list[dict]) -> dict:
    out = {}
    for k in (*FIGS, "throughput_rps"):
        vals = [r[k] for r in runs if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["caps"] = {k: int(sum(r["caps"][k] for r in runs)) for k in runs[0]["caps"]}
    return out


def rel(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base - 1.0


def choose(cells: dict, names: list[str], max_tput_loss: float = 0.005, max_ttft: float = 0.10) -> dict:
    """The candidate with the best mean TPOT gain over ``cells`` among those within the bounds in
    every one of them (TTFT P99 bounds online traffic only: an offline batch waits by design)."""
    scored = {}
    for name in names:
        gains, ok = [], True
        for cell in cells.values():
            f, c = cell["arms"]["fcfs"], cell["arms"][name]
            gains.append(-rel(c["tpot"], f["tpot"]))
            tput = rel(c["tok_s"], f["tok_s"])
            ttft = rel(c["ttft_p99"], f["ttft_p99"])
            if (tput is not None and tput < -max_tput_loss) or (cell["pattern"] != "offline" and ttft > max_ttft):
                ok = False
        scored[name] = {"mean_tpot_gain": float(np.mean(gains)), "within_bounds": ok}
    fit = [n for n in names if scored[n]["within_bounds"]]
    best = max(fit or names, key=lambda n: scored[n]["mean_tpot_gain"])
    return {"chosen": best, "scores": scored, "bounds": {"throughput": -max_tput_loss, "ttft_p99": max_ttft}}


def run_cell(a, pattern: str, seqs: int, rate: float, arms: dict, profile, tokenize, routing) -> dict:
    from sim.cpu_twin import run

    args = workload(a, pattern, seqs, rate)
    cell = {"pattern": pattern, "max_num_seqs": seqs, "rate": rate, "arms": {}}
    for name, (strategy, caps, oracle) in arms.items():
        t0 = time.perf_counter()
        runs = [run(args, s, strategy, profile, tokenize, a.kv, routing, caps, oracle) for s in a.seeds]
        cell["arms"][name] = mean_figs(runs)
        print(f"  {pattern} seqs={seqs} {name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return cell


def report(doc: dict) -> str:
    choices = doc["choice"]
    b = next(iter(choices.values()))["bounds"]  # choose()'s, the same for every pattern
    lines = [
        "# Where expert reads cost: CAPS in the twin of the CPU server (real-cost model)",
        "",
        f"Command: `{doc['command']}`",
        "",
        f"Profile `{doc['profile']}` (fitted on the live engine's step logs: {doc['profile_source']}); "
        f"step_cost priced by `{json.dumps(doc['cost'])}`; {len(doc['seeds'])} seeds per cell, arms on the same "
        f"arrivals; output lengths uniform in [{doc['min_tokens']}, {doc['max_tokens']}] tokens; Poisson at {doc['load']:g}x FCFS's capacity "
        f"(its offline throughput in the twin), offline batches of {doc['batch']}. Figures are means over seeds "
        "(the twin is deterministic: no interval); ratios to FCFS.",
        "",
        "**Rules chosen**, per traffic pattern (best mean TPOT gain over its cells among the candidates within "
        f"{b['throughput']:+.1%} throughput and, for online traffic, {b['ttft_p99']:+.0%} TTFT P99 of FCFS in "
        "every cell): ".replace("%", " %")
        + "; ".join(f"{p}: `{c['chosen']}`" for p, c in choices.items())
        + ".",
        "",
        "| cell | FCFS TPOT ms | tok/s | distinct experts/decode step | oracle TPOT | oracle tok/s | oracle "
        "makespan | chosen TPOT | chosen tok/s | chosen makespan | chosen TTFT P99 | share of the oracle's "
        "TPOT gain | reordered steps |",
        "|---" * 13 + "|",
    ]
    for key, cell in doc["cells"].items():
        ch = choices[cell["pattern"]]
        f, o, c = cell["arms"]["fcfs"], cell["arms"]["oracle"], cell["arms"][ch["chosen"]]
        og, cg = -rel(o["tpot"], f["tpot"]), -rel(c["tpot"], f["tpot"])
        share = f"{cg / og:.0%}" if og > 0.005 else "–"
        offline = cell["pattern"] == "offline"
        lines.append(
            f"| {key} | {f['tpot'] * 1e3:.1f} | {f['tok_s']:.1f} | {f['distinct_decode']:.1f} → "
            f"{c['distinct_decode']:.1f} (oracle {o['distinct_decode']:.1f}) | {rel(o['tpot'], f['tpot']):+.1%} | "
            f"{rel(o['tok_s'], f['tok_s']):+.1%} | {_r(o['makespan'], f['makespan']) if offline else '–'} | "
            f"{rel(c['tpot'], f['tpot']):+.1%} | {rel(c['tok_s'], f['tok_s']):+.1%} | "
            f"{_r(c['makespan'], f['makespan']) if offline else '–'} | {rel(c['ttft_p99'], f['ttft_p99']):+.1%} | {share} | "
            f"{c['caps']['reordered']} of {c['caps']['engaged']} engaged |".replace("%", " %")
        )
    lines += ["", "## Every candidate", ""]
    for p, ch in choices.items():
        lines += [f"{p}:", "", "| candidate | mean TPOT gain | within the bounds |", "|---|---|---|"]
        for name, sc in sorted(ch["scores"].items(), key=lambda kv: -kv[1]["mean_tpot_gain"]):
            lines.append(f"| {name} | {sc['mean_tpot_gain']:+.2%} | {'yes' if sc['within_bounds'] else 'no'} |")
        lines.append("")
    lines += [
        "",
        "What this is: a model of the live server, checked against it in `sim/results/cpu/fidelity.md`; the "
        "twin's CAPS predicts from the router dry run only (live, it also learns from the captured routing).",
        "",
    ]
    return "\n".join(lines).replace("%", " %").replace("  %", " %")


def _r(x, base) -> str:
    v = rel(x, base)
    return "–" if v is None else f"{v:+.1%}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.cpu_study", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="the measured cpu profile of the real-cost server")
    ap.add_argument("--model", default="", help="the served model (default: the real-cost model)")
    ap.add_argument("--prompts", default="", help="JSON-lines prompt pool (default: the project's)")
    ap.add_argument(
        "--fit",
        default="tests/benchmarks/results/cpu-1thread/step_cost.json",
        help="fit-step-cost's JSON at the server's core count: step_cost's coefficients",
    )
    ap.add_argument("--seqs", nargs="+", type=int, default=list(SEQS))
    ap.add_argument("--patterns", nargs="+", default=["poisson", "offline"])
    ap.add_argument("--load", type=float, default=0.97, help="Poisson rate as a share of FCFS's capacity")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of Poisson arrivals")
    ap.add_argument("--batch", type=int, default=128, help="requests of an offline batch")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--min-tokens", type=int, default=64, help="output lengths uniform in [min, max] (0: all max)")
    ap.add_argument("--chat-share", type=float, default=0.0)
    ap.add_argument("--kv", type=int, default=32768, help="KV cache tokens (the server's log says)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--min-gains", nargs="+", type=float, default=[0.0, 0.01, 0.02])
    ap.add_argument("--max-passes", nargs="+", type=int, default=[2, 16])
    ap.add_argument("--windows", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--out", default="sim/results/cpu")
    a = ap.parse_args(argv)
    from caps_vllm.real_cost import build
    from sim.captured_routing import CapturedRouting
    from sim.cpu_twin import Tokenize, run
    from sim.step_profile import MeasuredStep

    a.model = a.model or str(build())
    from caps_vllm.step_cost import StepCostModel

    a.cost = StepCostModel.load(a.fit).as_dict()
    profile = MeasuredStep.load(a.profile)
    tokenize, routing = Tokenize(a.model), CapturedRouting(a.model)
    cands = candidates(a.min_gains, a.max_passes, a.windows)
    arms = {"fcfs": ("fcfs", None, False), **{n: ("step_cost", c, False) for n, c in cands.items()}}
    arms["oracle"] = ("step_cost", ORACLE, True)
    doc = {
        "command": "python -m sim.cpu_study " + " ".join(sys.argv[1:] if argv is None else argv),
        "profile": a.profile,
        "profile_source": profile.source,
        "cost": a.cost,
        "seeds": a.seeds,
        "max_tokens": a.max_tokens,
        "min_tokens": a.min_tokens,
        "load": a.load,
        "batch": a.batch,
        "capacity_rps": {},
        "cells": {},
    }
    for seqs in a.seqs:
        cap = run(workload(a, "offline", seqs, 1.0), a.seeds[0], "fcfs", profile, tokenize, a.kv, routing)
        doc["capacity_rps"][seqs] = a.batch / cap["makespan"]
        for pattern in a.patterns:
            rate = a.load * doc["capacity_rps"][seqs]
            doc["cells"][f"{pattern} {seqs}"] = run_cell(a, pattern, seqs, rate, arms, profile, tokenize, routing)
    doc["choice"] = {
        p: choose({k: c for k, c in doc["cells"].items() if c["pattern"] == p}, list(cands)) for p in a.patterns
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "study.md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
