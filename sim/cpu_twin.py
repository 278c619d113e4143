"""A live CPU server's twin: a load test's workload through vLLM's scheduler on the virtual clock.

The same seeded arrivals as ``loadtest.workload.build`` (prompts tokenized as the server does:
completions as they are, chat through the template), the same output lengths, the same vLLM
budgets (vLLM's CPU defaults for the server's ``--max-num-seqs`` / ``--max-model-len``, the KV
blocks the server reports), the same scheduler class and CAPS config with the real predictor;
each step's MoE loads from the embedded model's own routing (:mod:`sim.captured_routing`: the
prompt's, then its greedy continuation's), priced by a measured ``cpu`` profile
(:mod:`sim.step_profile`). A request reaches the scheduler ``front_s`` after its scheduled time
and its tokens reach the client ``output_s`` after their step. Used by the fidelity check
(:mod:`sim.fidelity`) and the CPU regime study (:mod:`sim.cpu_study`).
"""

from __future__ import annotations

import json

import numpy as np

from loadtest.stats import quantiles
from sim.step_profile import MeasuredStep

CPU_BLOCK_SIZE = 128  # vLLM's CPU backend default (platforms/cpu.py)
CPU_MAX_BATCHED_TOKENS = 2048  # vllm serve's CPU default (EngineArgs)


class Tokenize:
    """Prompts as the server tokenizes them: completions as they are, chat through the template."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)

    def __call__(self, prompt: str, chat: bool) -> list[int]:
        if not chat:
            return list(self.tok(prompt)["input_ids"])
        ids = self.tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def figures(
    ttft: list[float], e2e: list[float], ends: list[float], steps: int, gaps: list[float], tokens: int, start: float
) -> dict:
    """One run's figures, computed alike for a live run and its twin. ``ends``: completion times
    from the schedule's start; ``gaps``: every inter-token gap; ``start``: when the batch could
    start (an offline batch's resume, else 0)."""
    t, e = quantiles(ttft), quantiles(e2e)
    last = max(ends) if ends else 0.0
    return {
        "steps": steps,
        "throughput_rps": len(ends) / last if last > 0 else None,
        "tok_s": tokens / (last - start) if last > start else None,
        "tpot": float(np.mean(gaps)) if gaps else None,
        "makespan": last - start if ends else None,
        "ttft_p50": t["p50"],
        "ttft_p90": t["p90"],
        "ttft_p99": t["p99"],
        "e2e_p50": e["p50"],
        "e2e_p90": e["p90"],
        "e2e_p99": e["p99"],
    }


def arrivals_of(args: dict, seed: int):
    from loadtest.workload import build, load_prompts

    return build(
        args["pattern"],
        load_prompts(args["prompts"] or None),
        rate=args["rate"],
        duration=args["duration"],
        max_requests=args["max_requests"],
        max_tokens=args["max_tokens"],
        min_tokens=args.get("min_tokens", 0),
        burst_len=args["burst_len"],
        chat_share=args["chat_share"],
        seed=seed,
        trace=args["trace"] or None,
        speedup=args["speedup"],
        hold=args.get("hold", 0.0),
    )


def arrival_times(sent: list[float], front_s: float, hold: float) -> list[float]:
    """When each request reaches the scheduler: ``front_s`` after it was sent, and an offline
    batch, queued while the scheduler is paused, at the resume in the order it was sent, a
    microsecond apart (CAPS's starvation bound counts who was passed over by a younger request;
    live, no two arrivals tie)."""
    return [max(t + front_s, hold + i * 1e-6) for i, t in enumerate(sent)]


def run(
    args: dict,
    seed: int,
    arm: str,
    profile: MeasuredStep,
    tokenize: Tokenize,
    kv: int,
    routing,
    caps: dict | None = None,
    oracle: bool = False,
) -> dict:
    """One run of one arm through the twin: its figures, and what CAPS did.

    ``args``: the load test's options (``loadtest.compare``'s, as in its compare.json); ``arm``: a
    CAPS strategy name; ``caps``: CAPS settings over ``args["caps_config"]``; ``oracle``: CAPS is
    handed each request's true decode routing (its continuation's, per token) instead of its
    prediction, what no predictor can know in advance."""
    from caps_vllm.routing import counts_from_rows
    from caps_vllm.scheduler import CapsScheduler
    from loadtest.compare import arm_caps
    from sim.step_time import VllmStepTime
    from sim.twin import Deployment, Twin, TwinRequest, build_scheduler

    hold = float(args.get("hold", 0.0)) if args["pattern"] == "offline" else 0.0
    arrivals = arrivals_of(args, seed)
    reqs = [
        TwinRequest(f"r{i}", t, tokenize(a.prompt, a.chat), a.max_tokens, a.category)
        for i, (a, t) in enumerate(zip(arrivals, arrival_times([a.t for a in arrivals], profile.front_s, hold)))
    ]
    d = Deployment(
        args["max_num_seqs"],
        CPU_MAX_BATCHED_TOKENS,
        max(1, kv // CPU_BLOCK_SIZE),
        block_size=CPU_BLOCK_SIZE,
        max_model_len=args["max_model_len"],
        enable_prefix_caching="--no-enable-prefix-caching" not in args.get("serve_arg", []),
    )
    cfg = {**arm_caps(arm, {**json.loads(args["caps_config"]), **(caps or {})}), "metrics": False}
    sched = build_scheduler(args["model"], CapsScheduler, d, caps=cfg, dtype="float32")

    def on_arrival(r, req) -> None:
        routing.bind(r.rid, r.prompt, r.output_tokens)
        if oracle:
            decode = routing.rows(r.rid)[len(r.prompt) :]
            if len(decode):
                req.caps_vector = counts_from_rows(decode, routing.experts).ravel() / len(decode)

    res = Twin(sched, VllmStepTime(profile, routing), block_size=CPU_BLOCK_SIZE, on_arrival=on_arrival).run(reqs)
    # The twin's clock starts with the schedule; the client counts from the scheduled time.
    out, front = profile.output_s, profile.front_s
    served = list(res.served.values())
    f = figures(
        [s.ttft_s + front + out for s in served if s.ttft_s is not None],
        [s.e2e_s + front + out for s in served if s.e2e_s is not None],
        [s.finished_s + out for s in served if s.finished_s is not None],
        len(res.steps),
        [g for s in served for g in s.itl_s],
        sum(len(s.token_s) for s in served),
        hold,
    )
    decode_steps = [st for st in res.steps if st.prefill_tokens == 0 and st.distinct_experts is not None]
    f["distinct_decode"] = float(np.mean([st.distinct_experts for st in decode_steps])) if decode_steps else None
    f["decode_steps_share"] = len(decode_steps) / len(res.steps) if res.steps else None
    f["out_of_order"] = sum(st.out_of_order for st in res.steps)  # admissions FCFS would not have made
    stats = sched.caps.planner.stats
    f["caps"] = {k: getattr(stats, k) for k in ("engaged", "plans", "reordered", "kept_fcfs", "pinned")}
    return f
