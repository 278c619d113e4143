"""Run an engine with CAPS's routing capture and compare it with transformers' own routing.

    python tests/capture_run.py MODEL [eager|compiled]
Prints one JSON line: for every prompt, whether the captured prompt-token counts equal the
top-k of transformers' router logits on the same weights, plus the step records' totals.
A separate program because a vLLM engine needs its own process and a __main__ guard.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler is readable in this process
    import numpy as np
    import torch
    from vllm import LLM, SamplingParams

    from caps_vllm.routing import counts_from_rows
    from caps_vllm.tiny_model import prompt_pool

    model, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "eager")
    llm = LLM(
        model=model,
        scheduler_cls="caps_vllm.CapsScheduler",
        max_model_len=512,
        enforce_eager=mode == "eager",
        seed=0,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        dtype="float32",
        additional_config={"caps": {"capture_decode": True, "learn_rows_per_step": 40}},
    )
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    prompt_counts: dict[str, np.ndarray] = {}
    steps = {"records": 0, "routed": 0, "scheduled": 0, "layer_sum": 0, "max_rows": 0}
    rows_of: dict[str, list] = {}  # rid -> [(start, rows)] shipped for the learning table
    decode: dict[str, np.ndarray] = {}
    update = type(sched).update_from_output

    def spy(self, scheduler_output, output):  # what the scheduler receives from the worker
        rec = getattr(output, "caps_routing", None)
        steps["scheduled"] += scheduler_output.total_num_scheduled_tokens
        if rec is not None:
            steps["records"] += 1
            steps["routed"] += rec.num_tokens
            steps["layer_sum"] += int(rec.layer_counts.sum())
            for rid, c in rec.prompt_counts.items():
                prompt_counts[rid] = prompt_counts.get(rid, 0) + c
            for rid, c in rec.decode_counts.items():
                decode[rid] = decode.get(rid, 0) + c
            for rid, r in rec.prompt_rows.items():
                rows_of.setdefault(rid, []).append((rec.prompt_start[rid], r))
            steps["max_rows"] = max(steps["max_rows"], sum(len(r) for r in rec.prompt_rows.values()))
        return update(self, scheduler_output, output)

    type(sched).update_from_output = spy
    prompts = [r["prompt"] for r in prompt_pool()][:8]
    prompts.append(" ".join(prompts[:4]))  # > 64 tokens: a chunked prefill over several steps
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True))
    result = {"steps": steps, "prompts": [], "moe": bool(prompt_counts)}
    if prompt_counts:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32)
        k, e = hf.config.num_experts_per_tok, hf.config.num_experts
        for o in outs:
            with torch.no_grad():
                logits = hf(torch.tensor([o.prompt_token_ids]), output_router_logits=True).router_logits
            rows = np.stack([torch.topk(lg, k, dim=-1).indices.numpy() for lg in logits], axis=1)
            truth = counts_from_rows(rows, e)
            rid = next(r for r in prompt_counts if r.split("-")[0] == o.request_id)
            got = prompt_counts[rid]
            shipped = rows_of.get(rid, [])
            result["prompts"].append(
                {
                    "tokens": len(o.prompt_token_ids),
                    "equal": bool(np.array_equal(got, truth)),
                    "total": int(got.sum()),
                    # the rows shipped for learning are the routed ids of exactly those prompt positions
                    # (as sets: vLLM and transformers order a top-k differently)
                    "rows_equal": all(
                        np.array_equal(np.sort(r, -1), np.sort(rows[s : s + len(r)], -1)) for s, r in shipped
                    ),
                    "rows": sum(len(r) for _, r in shipped),
                    "decode_total": int(decode[rid].sum()) if rid in decode else 0,
                }
            )
    result["top_k"] = sched.caps.predictor.top_k if sched.caps.predictor is not None else None
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
