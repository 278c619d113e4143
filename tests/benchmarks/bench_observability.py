"""What routing capture and CAPS metrics cost: engine throughput with them on and off.

Printed figures, not a test. The embedded tiny model in vllm.LLM (CPU, eager, in-process),
CAPS scheduler both times with the same strategy; "on" = capture + metrics + the learning
table (the default), "off" = `{"capture": false, "metrics": false}`. Each configuration runs in its own process
(one engine per process); each times ROUNDS generate() calls of PROMPTS prompts x TOKENS
tokens after one warm-up call, and the two run alternately REPEATS times (the machine is
noisy). Reported: median generate() wall time per configuration and the ratio on/off.

    python tests/benchmarks/bench_observability.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS, TOKENS, ROUNDS = 32, 24, 3


def child(model: str, caps: dict) -> None:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from caps_vllm.tiny_model import prompt_pool

    llm = LLM(
        model=model,
        scheduler_cls="caps_vllm.CapsScheduler",
        max_model_len=512,
        enforce_eager=True,
        seed=0,
        max_num_seqs=8,
        additional_config={"caps": caps},
    )
    prompts = [r["prompt"] for r in sorted(prompt_pool(), key=lambda r: r["category"])][:PROMPTS]
    sp = SamplingParams(temperature=0.0, max_tokens=TOKENS, ignore_eos=True)
    llm.generate(prompts, sp, use_tqdm=False)  # warm-up
    times = []
    for _ in range(ROUNDS):
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    print("RESULT " + json.dumps(times), flush=True)


def observer_step_cost(layers: int = 24, experts: int = 60, top_k: int = 4, running: int = 256) -> None:
    """The scheduler-side cost per step at Qwen1.5-MoE shape: a decode step of ``running``
    requests (predicted load, imbalance of both, histograms) — what the tiny model cannot show."""
    import numpy as np

    from caps_vllm.metrics import CapsMetrics
    from caps_vllm.observer import RoutingObserver
    from caps_vllm.routing import RoutingRecord

    rng = np.random.default_rng(0)
    d = layers * experts
    vecs = {f"r{i}": rng.dirichlet(np.ones(d)) * layers * top_k for i in range(running)}
    obs = RoutingObserver(CapsMetrics("bench", "0"), lambda ids: None, layers, experts, top_k)
    sched = {rid: 1 for rid in vecs}
    rec = RoutingRecord(tuple(range(layers)), rng.integers(0, 20, size=(layers, experts)), running)
    samples = []
    for _ in range(200):
        t0 = time.perf_counter()
        obs.on_schedule(sched, vecs.get)
        obs.on_output(rec, lambda rid: None)
        samples.append(time.perf_counter() - t0)
    print(
        f"observer per decode step, {running} running, {layers}x{experts} experts: "
        f"median {statistics.median(samples) * 1e3:.3f} ms, mean {statistics.mean(samples) * 1e3:.3f} ms "
        f"(the figures are exported every {obs.batch_steps} steps: the mean carries that step's share)"
    )


def learner_step_cost(
    vocab: int = 151936, layers: int = 24, experts: int = 60, top_k: int = 4, rows: int = 256, max_tokens: int = 8192
) -> None:
    """The learning table's work per step at Qwen1.5-MoE shape: ``rows`` prompt tokens learned
    (the default ``learn_rows_per_step``) with the table full, tokens drawn Zipf-like."""
    import numpy as np

    from caps_vllm.learned_table import LearnedTable

    rng = np.random.default_rng(0)
    prior = rng.integers(0, experts, size=(vocab, layers, top_k), dtype=np.uint8)
    lt = LearnedTable(prior, experts, max_tokens=max_tokens)
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    p /= p.sum()
    samples = []
    for i in range(300):
        ids = rng.choice(vocab, rows, p=p)
        routed = rng.integers(0, experts, size=(rows, layers, top_k))
        t0 = time.perf_counter()
        lt.observe(ids, routed)
        if i >= 100:  # the table is warm (and evicting) by then
            samples.append(time.perf_counter() - t0)
    print(
        f"learning table (its own thread; the step only queues rows) per step, {rows} prompt tokens, "
        f"{layers}x{experts} experts, {max_tokens} tokens tracked "
        f"({lt.bytes / 2**20:.0f} MB): median {statistics.median(samples) * 1e3:.2f} ms, "
        f"p99 {np.percentile(samples, 99) * 1e3:.2f} ms"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    observer_step_cost()
    learner_step_cost()
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(root),
    }
    model = (
        subprocess.run(
            [sys.executable, "-m", "caps_vllm.tiny_model"], capture_output=True, text=True, check=True, env=env
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    configs = {"on": {}, "off": {"capture": False, "metrics": False}}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(args.repeats):
        for name, caps in configs.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", model, json.dumps(caps)],
                capture_output=True,
                text=True,
                env=env,
                timeout=900,
            )
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{name} run failed:\n{out.stderr[-3000:]}")
            times[name] += json.loads(line[7:])
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    n = PROMPTS * TOKENS
    print(
        f"routing capture + metrics + learning, tiny model, {PROMPTS} prompts x {TOKENS} tokens, "
        f"{len(times['on'])} timed generate() calls each"
    )
    print(f"  off: {off:.3f} s ({n / off:.0f} tok/s)   on: {on:.3f} s ({n / on:.0f} tok/s)   on/off = {on / off:.3f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], json.loads(sys.argv[3]))
    else:
        main()
