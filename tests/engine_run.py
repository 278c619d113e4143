"""Run the embedded model with vllm.LLM and print greedy outputs (and CAPS counters) as JSON.

A separate program because a vLLM engine needs its own process and a __main__ guard:
    python tests/engine_run.py MODEL [caps_vllm.CapsScheduler] [CAPS_JSON] [small|cpu-defaults]
``small`` (the default): 4 sequences at most, 48 short prompts. ``cpu-defaults``: vLLM's own
budgets for an offline engine on a CPU (256 sequences, 4096 tokens) and 96 prompts of about
140 tokens at once, so the
queue forms on the token budget as it does in production.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine in this process: its scheduler is readable
    from vllm import LLM, SamplingParams

    from caps_vllm.tiny_model import prompt_pool

    model, sched = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] else None)
    caps = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    defaults = len(sys.argv) > 4 and sys.argv[4] == "cpu-defaults"
    budgets = {} if defaults else {"max_num_seqs": 4}
    # float32: the same arithmetic as transformers' reference (tests compare greedy outputs)
    llm = LLM(
        model=model,
        scheduler_cls=sched,
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        dtype="float32",
        additional_config={"caps": caps} if caps else {},
        **budgets,
    )
    pool = sorted(prompt_pool(), key=lambda r: r["category"])
    # Topic bursts: runs of one category, so admission order has something to change.
    prompts = [row["prompt"] for row in pool][:48]
    if defaults:  # longer prompts, each eight neighbours (mostly of one category) joined
        prompts = [" ".join(pool[(i + j) % len(pool)]["prompt"] for j in range(8)) for i in range(96)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    chats = llm.chat(
        [[{"role": "user", "content": p}] for p in prompts[:6]], SamplingParams(temperature=0.0, max_tokens=6)
    )
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    caps = getattr(scheduler, "caps", None)
    if caps is not None and caps.worker is not None:
        caps.worker.idle(10)  # (the last step's job)
    stats = vars(caps.planner.stats) if caps is not None else None
    learner = caps.learner if caps is not None else None
    if learner is not None:
        learner.flush()
    print(
        "RESULT "
        + json.dumps(
            {
                "scheduler": type(scheduler).__name__,
                "outputs": [list(o.outputs[0].token_ids) for o in outs],
                "chat": [list(o.outputs[0].token_ids) for o in chats],
                "caps_stats": stats,
                "caps_counters": dict(caps.counters) if caps is not None else {},
                "budgets": [scheduler.max_num_running_reqs, scheduler.max_num_scheduled_tokens],
                "learner": None
                if learner is None
                else {
                    "rows": learner.table.rows_learned,
                    "resumed": learner.resumed,
                    "changed": int((learner.table.table != learner.table.prior).any(axis=(1, 2)).sum()),
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
