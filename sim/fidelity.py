"""How close the twin comes to the live server: the same workloads through both, errors measured.

For each live comparison folder (``loadtest.compare ... --step-log``: every arm run on fresh
``vllm serve`` processes, ≥ 3 interleaved repetitions) the twin replays each repetition: the
same seeded arrival schedule (``loadtest.workload.build`` with the run's own options), the same
prompts tokenized as the server tokenizes them (the model's tokenizer; chat requests through
its chat template), the same output lengths, the same vLLM budgets (vLLM's CPU defaults for the
server's ``--max-num-seqs`` / ``--max-model-len``, the KV blocks the server's log reports) and
the same scheduler class and CAPS config, with the real predictor; the MoE loads of each step
are the embedded model's own captured routing (:mod:`sim.captured_routing`). Steps are priced by the
measured ``cpu`` profile (:mod:`sim.step_profile`, fitted on *other* runs: calibration
workloads, never these); a request reaches the scheduler ``front_s`` after its scheduled time
and its tokens reach the client ``output_s`` after their step.

Per arm and workload, figures of both sides computed the same way: engine steps (live: the step
log's lines), throughput (completed / last completion, from the schedule's start), TTFT and E2E
P50/P90 (nearest rank). The live side gives the mean over repetitions and its 95 % t interval;
the twin's error is its mean against the live mean; a figure meets its goal when the error is
within the goal (throughput and steps 5 %, P50 10 %, P90 20 %) or the twin's mean is inside the
live interval.

    python -m sim.fidelity --profile sim/profiles/cpu-tiny.json --live DIR [DIR ...] --out sim/results/twin
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from sim.captured_routing import CapturedRouting
from sim.metrics import quantiles
from sim.step_profile import MeasuredStep
from sim.step_time import VllmStepTime

#: (figure, goal as a relative error)
GOALS = (("steps", 0.05), ("throughput_rps", 0.05), ("ttft_p50", 0.10), ("ttft_p90", 0.20),
         ("e2e_p50", 0.10), ("e2e_p90", 0.20))
CPU_BLOCK_SIZE = 128  # vLLM's CPU backend default (platforms/cpu.py)
CPU_MAX_BATCHED_TOKENS = 2048  # vllm serve's CPU default (EngineArgs)


def figures(ttft: list[float], e2e: list[float], ends: list[float], steps: int) -> dict:
    """One run's figures; ``ends``: completion times from the schedule's start."""
    t, e = quantiles(ttft), quantiles(e2e)
    last = max(ends) if ends else 0.0
    return {"steps": steps, "throughput_rps": len(ends) / last if last > 0 else None,
            "ttft_p50": t["p50"], "ttft_p90": t["p90"], "e2e_p50": e["p50"], "e2e_p90": e["p90"]}


def live_figures(run_dir: Path) -> dict:
    """A live run's figures from its Locust samples and its engine step log."""
    from caps_vllm.step_log import read
    from loadtest.records import read_samples

    ok = [s for s in read_samples(run_dir / "samples.jsonl") if s.get("error") is None]
    steps, _ = read(run_dir / "steps.jsonl")
    return figures([s["ttft_s"] for s in ok], [s["e2e_s"] for s in ok],
                   [s["t"] + s["held_s"] + s["lag_s"] + s["e2e_s"] for s in ok], len(steps))


def kv_tokens(serve_log: Path) -> int | None:
    """The KV cache size the server reported (``CPU KV cache size: N tokens``)."""
    m = re.search(r"KV cache size: ([\d,]+) tokens", serve_log.read_text(errors="replace"))
    return int(m.group(1).replace(",", "")) if m else None


class Tokenize:
    """Prompts as the server tokenizes them: completions as they are, chat through the template."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def __call__(self, prompt: str, chat: bool) -> list[int]:
        if not chat:
            return list(self.tok(prompt)["input_ids"])
        ids = self.tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def twin_run(args: dict, seed: int, arm: str, profile: MeasuredStep, tokenize: Tokenize, kv: int,
             routing_for) -> dict:
    """One repetition of one arm through the twin: its figures."""
    from caps_vllm.scheduler import CapsScheduler
    from loadtest.workload import build, load_prompts
    from sim.twin import Deployment, Twin, TwinRequest, build_scheduler

    arrivals = build(args["pattern"], load_prompts(args["prompts"] or None), rate=args["rate"],
                     duration=args["duration"], max_requests=args["max_requests"], max_tokens=args["max_tokens"],
                     burst_len=args["burst_len"], chat_share=args["chat_share"], seed=seed,
                     trace=args["trace"] or None, speedup=args["speedup"])
    reqs = [TwinRequest(f"r{i}", a.t + profile.front_s, tokenize(a.prompt, a.chat), a.max_tokens, a.category)
            for i, a in enumerate(arrivals)]
    d = Deployment(args["max_num_seqs"], CPU_MAX_BATCHED_TOKENS, max(1, kv // CPU_BLOCK_SIZE),
                   block_size=CPU_BLOCK_SIZE, max_model_len=args["max_model_len"])
    caps = {**json.loads(args["caps_config"]), "strategy": arm, "metrics": False}
    sched = build_scheduler(args["model"], CapsScheduler, d, caps=caps, dtype="float32")
    routing = routing_for(args["model"])
    res = Twin(sched, VllmStepTime(profile, routing), block_size=CPU_BLOCK_SIZE,
               on_arrival=lambda r, req: routing.bind(r.rid, r.prompt)).run(reqs)
    # The twin's clock starts with the schedule; the client counts from the scheduled time.
    out, front = profile.output_s, profile.front_s
    served = list(res.served.values())
    return figures([s.ttft_s + front + out for s in served], [s.e2e_s + front + out for s in served],
                   [s.finished_s + out for s in served], len(res.steps))


def interval(xs: list[float]) -> dict:
    """Mean of the live repetitions with its 95 % t interval."""
    from loadtest.stats import t975

    a = np.asarray([x for x in xs if x is not None], dtype=np.float64)
    if len(a) < 2:
        return {"mean": float(a.mean()) if len(a) else None, "lo": None, "hi": None, "n": len(a)}
    half = t975(len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a))
    return {"mean": float(a.mean()), "lo": float(a.mean() - half), "hi": float(a.mean() + half), "n": len(a)}


def compare_workload(folder: Path, profile: MeasuredStep, tokenize_for, routing_for) -> dict:
    """Every arm of one live comparison folder against the twin."""
    doc = json.loads((folder / "compare.json").read_text())
    args = doc["args"]
    cell = {"workload": folder.name, "command": doc["command"], "arms": {}}
    for arm in doc["arms"]:
        runs = [r for r in doc["runs"] if r["label"] == arm and r["status"] == "ok"]
        live, twin = [], []
        for r in runs:
            d = folder / "raw" / f"r{r['repeat']}-{arm}"
            if not (d / "steps.jsonl").exists():
                raise ValueError(f"{d}: no steps.jsonl (run loadtest.compare with --step-log)")
            live.append(live_figures(d))
            kv = kv_tokens(d / "serve.log")
            if kv is None:
                raise ValueError(f"{d / 'serve.log'}: no 'KV cache size' line")
            t0 = time.perf_counter()
            twin.append(twin_run(args, r["seed"], arm.removesuffix("-aa"), profile, tokenize_for(args["model"]), kv,
                                 routing_for))
            print(f"  {folder.name} {arm} repetition {r['repeat'] + 1}: twin in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        fig = {}
        for name, goal in GOALS:
            lv = interval([x[name] for x in live])
            tw = float(np.mean([x[name] for x in twin]))
            err = tw / lv["mean"] - 1.0 if lv["mean"] else None
            inside = lv["lo"] is not None and lv["lo"] <= tw <= lv["hi"]
            fig[name] = {"live": lv, "twin": tw, "error": err, "goal": goal, "inside_live_interval": inside,
                         "meets_goal": bool(inside or (err is not None and abs(err) <= goal)),
                         "live_runs": [x[name] for x in live], "twin_runs": [x[name] for x in twin]}
        cell["arms"][arm] = fig
    return cell


def report(doc: dict) -> str:
    lines = ["# Twin fidelity: the twin against live vllm serve on this CPU", "",
             f"Command: `{doc['command']}`", "",
             f"Profile `{doc['profile']}` (fitted on {doc['profile_source']}, not on these runs): "
             + ", ".join(f"{k} {v:.3g}" for k, v in doc["profile_coefficients"].items()) + ".", "",
             "Error = twin mean / live mean − 1 over the repetitions; live: mean [95 % t interval over "
             "repetitions]. Goal met (✓) when the error is within the goal or the twin is inside the live "
             "interval. Throughput = completed / last completion; quantiles by nearest rank on both sides.", ""]
    for cell in doc["cells"]:
        lines += [f"## {cell['workload']}", "", f"Live: `{cell['command']}`", "",
                  "| arm | figure | live | twin | error | goal | |", "|---|---|---|---|---|---|---|"]
        for arm, figs in cell["arms"].items():
            for name, f in figs.items():
                lv = f["live"]
                ci = f" [{lv['lo']:.4g}–{lv['hi']:.4g}]" if lv["lo"] is not None else ""
                err = f"{f['error']:+.1%}" if f["error"] is not None else "–"
                lines.append(f"| {arm} | {name} | {lv['mean']:.4g}{ci} | {f['twin']:.4g} | {err} | "
                             f"±{f['goal']:.0%} | {'✓' if f['meets_goal'] else '✗'} |")
        lines.append("")
    s = doc["summary"]
    lines += [f"Goals met: {s['met']} of {s['figures']} figures; median |error| {s['median_abs_error']:.1%}.", "",
              "What a CPU run cannot show: the tiny model's steps are Python- and overhead-bound, so this "
              "checks the twin's scheduling and clock against vLLM's, not the GPU roofline profiles.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", required=True, help="a measured step profile (python -m sim.step_profile)")
    ap.add_argument("--live", nargs="+", required=True, help="loadtest.compare folders run with --step-log")
    ap.add_argument("--out", required=True, help="folder for fidelity.json and fidelity.md")
    args = ap.parse_args(argv)
    profile = MeasuredStep.load(args.profile)
    tokenize_for, routing_for = functools.cache(Tokenize), functools.cache(CapturedRouting)
    cells = [compare_workload(Path(f), profile, tokenize_for, routing_for) for f in args.live]
    figs = [f for c in cells for a in c["arms"].values() for f in a.values()]
    errs = [abs(f["error"]) for f in figs if f["error"] is not None]
    coef = {k: getattr(profile, k) for k in ("fixed_s", "token_s", "prefill_request_s", "decode_request_s",
                                             "context_s", "expert_s", "front_s", "output_s")}
    doc = {"command": "python -m sim.fidelity " + " ".join(sys.argv[1:] if argv is None else argv),
           "profile": args.profile, "profile_source": profile.source, "profile_coefficients": coef,
           "profile_fit": profile.fit, "cells": cells,
           "summary": {"figures": len(figs), "met": sum(f["meets_goal"] for f in figs),
                       "median_abs_error": float(np.median(errs)) if errs else None}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "fidelity.md").write_text(report(doc))
    print(report(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
