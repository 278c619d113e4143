"""The predictor measured on the live engine: router dry run, learning table, token-id ceiling, chance.

A real vLLM engine serves the embedded trained model with the CAPS scheduler (FCFS order, so
nothing but the predictor is under test), prefix caching off so every prompt token is routed,
``caps.learn`` on with a row budget that covers every prompt token, and ``caps.capture_decode``
on. The workers' capture is the ground truth: every prompt token's routed experts per MoE layer
and every request's decode-token expert counts. From it, per MoE layer:

* **prompt tokens, top-k recall**: share of a token's routed top-k that a table predicts for
  its id: the router dry run; the *ceiling* (each token id's k most frequent experts over the
  whole run, in-sample: no token-id table can do better); chance (k / E); the learning table
  prequentially (each step's rows scored before it learns them, as ``vllm:caps_learning_hits``
  exports), over the run's last quarter, after it served the first three quarters.
* **prompt histograms**: per request, cosine and top-k overlap of the predicted and the actual
  per-layer expert histogram of its prompt (what ``vllm:caps_predictor_*`` exports).
* **decode**: per request, the same two figures of its prompt's prediction against what its
  *decode* tokens actually routed (what CAPS schedules on): dry run, ceiling table, the prompt's
  own actual histogram (a perfect prompt predictor), uniform.

    python -m sim.predictor_study --requests 3000 --out sim/results/routing
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from caps_vllm.learned_table import topk_hits
from caps_vllm.routing import cosine, counts_from_rows, topk_overlap
from caps_vllm.tiny_model import prompt_pool
from caps_vllm.train_tiny import HELD_OUT_EVERY
from sim.plots import predictor_figure, write_study

POOL = Path("../shared/data/prompts/topic_prompts_combined.jsonl")


def serve(model: str, rows: list[dict], max_prompt: int, decode: int, seed: int, cache: str) -> dict:
    """Run the prompts through a live engine; returns per-request captures and the learning curve."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler in this process, readable
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model)
    caps = {"strategy": "fcfs", "learn": True, "learn_rows_per_step": 4096, "capture_decode": True, "cache_dir": cache}
    llm = LLM(
        model=model,
        scheduler_cls="caps_vllm.CapsScheduler",
        max_model_len=max_prompt + decode + 8,
        enforce_eager=True,
        seed=seed,
        enable_prefix_caching=False,
        gpu_memory_utilization=0.5,
        additional_config={"caps": caps},
    )
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    sched.caps.learner.background = False  # learn inline: each step's recall is read after its rows are learned
    prompt_rows: dict[str, list] = {}
    decode_counts: dict[str, np.ndarray] = {}
    curve: list[tuple[int, int, int, int]] = []  # (prompts fully routed, picks, learned hits, prior hits)
    routed = [0]
    inner = sched.update_from_output

    def recording(scheduler_output, model_runner_output):
        rec = getattr(model_runner_output, "caps_routing", None)
        if rec is not None:
            # (the engine suffixes the LLM's request ids: "7" runs as "7-<random>")
            for rid, r in rec.prompt_rows.items():
                prompt_rows.setdefault(rid.rsplit("-", 1)[0], []).append((rec.prompt_start[rid], r.copy()))
                routed[0] += rec.prompt_start[rid] + len(r) >= sched.requests[rid].num_prompt_tokens
            for rid, c in rec.decode_counts.items():
                key = rid.rsplit("-", 1)[0]
                decode_counts[key] = decode_counts.get(key, 0) + c
        out = inner(scheduler_output, model_runner_output)
        rc = sched.caps.learner.table.recall
        curve.append((routed[0], rc.picks, rc.learned_hits, rc.prior_hits))
        return out

    sched.update_from_output = recording
    prompts = [{"prompt_token_ids": tok(r["prompt"], add_special_tokens=False)["input_ids"][:max_prompt]} for r in rows]
    params = SamplingParams(temperature=0.8, max_tokens=decode, ignore_eos=True)  # (per-request seeds: not on CPU)
    started = time.monotonic()
    outs = llm.generate(prompts, params)
    wall = time.monotonic() - started
    requests = []
    for o, p in zip(outs, prompts):
        chunks = sorted(prompt_rows.get(o.request_id, []), key=lambda c: c[0])
        routed = np.concatenate([c[1] for c in chunks]) if chunks else np.zeros((0,), dtype=np.uint8)
        requests.append(
            {"ids": np.asarray(p["prompt_token_ids"]), "rows": routed, "decode": decode_counts.get(o.request_id)}
        )
    pred = sched.caps.predictor
    return {
        "requests": requests,
        "curve": np.asarray(curve),
        "dry_table": pred.table,
        "learned_table": sched.caps.learner.table.table.copy(),
        "num_experts": pred.num_experts,
        "moe_layers": list(pred.moe_layers),
        "wall_s": wall,
    }


def token_recall(table: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Per layer: share of the routed top-k picks that ``table`` predicts for each token id."""
    return topk_hits(table, ids, rows).mean(axis=(0, 2))


def ceiling_table(ids: np.ndarray, rows: np.ndarray, vocab: int, experts: int) -> tuple[np.ndarray, np.ndarray]:
    """The best token-id table in-sample (each id's k most frequent experts) and its per-layer recall."""
    layers, k = rows.shape[1], rows.shape[2]
    counts = np.zeros((vocab, layers, experts), dtype=np.int64)
    np.add.at(counts, (ids[:, None, None], np.arange(layers)[None, :, None], rows.astype(np.int64)), 1)
    table = np.argsort(-counts, axis=2, kind="stable")[:, :, :k]
    best = np.take_along_axis(counts, table, axis=2).sum(axis=(0, 2))
    return table, best / (len(ids) * k)


def per_layer(pred: np.ndarray, actual: np.ndarray, k: int) -> tuple[list[float], list[float]]:
    cos = [cosine(p, a) for p, a in zip(pred, actual)]
    ovl = [topk_overlap(p[None], a[None], k) for p, a in zip(pred, actual)]
    return cos, ovl


def analyse(run: dict) -> dict:
    reqs = [r for r in run["requests"] if len(r["rows"]) == len(r["ids"])]
    experts, k = run["num_experts"], run["dry_table"].shape[2]
    vocab = run["dry_table"].shape[0]
    ids = np.concatenate([r["ids"] for r in reqs])
    rows = np.concatenate([r["rows"] for r in reqs])
    ceil_tab, ceil = ceiling_table(ids, rows, vocab, experts)
    doc: dict = {
        "requests": len(reqs),
        "prompt_tokens": int(len(ids)),
        "top_k": k,
        "experts": experts,
        "moe_layers": run["moe_layers"],
        "chance_recall": k / experts,
    }
    doc["token_recall"] = {
        "dry_run": token_recall(run["dry_table"], ids, rows).tolist(),
        "ceiling": ceil.tolist(),
        "learned_final_in_sample": token_recall(run["learned_table"], ids, rows).tolist(),
    }
    # The learning table, prequentially: picks scored before they were learned, over the last quarter.
    curve = run["curve"]
    n = int(curve[-1, 0])
    q = curve[np.searchsorted(curve[:, 0], int(0.75 * n)) - 1]
    last = curve[-1] - q
    doc["learned_prequential_last_quarter"] = {
        "after_requests": int(q[0]),
        "recall": float(last[2] / last[1]),
        "dry_run_recall": float(last[3] / last[1]),
        "share_of_ceiling": float(last[2] / last[1] / ceil.mean()),
    }
    doc["learning_curve"] = [
        {"requests": int(c[0]), "learned": float(c[2] / c[1]), "dry_run": float(c[3] / c[1])}
        for c in _window_rates(curve, 20)
    ]
    # Per-request histograms: prompt and decode, per layer, means over requests; each
    # prediction is scored against the request's prompt routing and against its decode routing.
    actual = [counts_from_rows(r["rows"], experts) for r in reqs]
    tables = {"dry_run": run["dry_table"], "ceiling": ceil_tab, "learned": run["learned_table"]}
    predicted = {name: [counts_from_rows(tab[r["ids"]], experts) for r in reqs] for name, tab in tables.items()}
    predicted["actual_prompt"] = actual  # a perfect prompt predictor (of decode routing only)
    predicted["uniform"] = [np.ones(a.shape) for a in actual]
    truths = {"prompt": actual, "decode": [r["decode"] for r in reqs]}
    sections: dict = {target: {} for target in truths}
    for name, preds in predicted.items():
        for target, truth in truths.items():
            if name == "actual_prompt" and target == "prompt":
                continue
            scores = [per_layer(p, t, k) for p, t in zip(preds, truth) if t is not None]
            sections[target][name] = {
                "cosine": _mean_layers([c for c, _ in scores]),
                "topk_overlap": _mean_layers([o for _, o in scores]),
            }
            if name == "uniform":  # no ranking to compare: a random top-k overlaps k/E on average
                sections[target][name]["topk_overlap"] = [round(k / experts, 4)] * len(run["moe_layers"])
    doc["histograms"] = sections
    return doc


def _mean_layers(values: list[list]) -> list[float]:
    arr = np.array([[np.nan if v is None else v for v in layer] for layer in values], dtype=np.float64)
    return np.nanmean(arr, axis=0).round(4).tolist()


def _window_rates(curve: np.ndarray, points: int) -> list[np.ndarray]:
    """Recall over consecutive windows of finished requests (differences of the cumulative counts)."""
    n = int(curve[-1, 0])
    edges = np.linspace(0, n, points + 1).astype(int)
    out, prev = [], np.zeros(4)
    for e in edges[1:]:
        cur = curve[min(len(curve) - 1, np.searchsorted(curve[:, 0], e))]
        d = cur - prev
        if d[1] > 0:
            out.append(np.array([cur[0], d[1], d[2], d[3]]))
        prev = cur
    return out


def report(doc: dict) -> str:
    tr, layers = doc["token_recall"], doc["moe_layers"]
    lines = [
        "# The predictor on the trained embedded model, live capture as ground truth",
        "",
        f"`python -m sim.predictor_study --requests {doc['requests_asked']}` — {doc['requests']} requests "
        f"({doc['prompt_tokens']} prompt tokens, {doc['decode_tokens']} decode tokens each, temperature 0.8) "
        f"through a live vLLM engine (CAPS scheduler, FCFS order, prefix cache off), {doc['wall_s']:.0f} s. "
        f"Top-{doc['top_k']} of {doc['experts']} experts; chance recall {doc['chance_recall']:.3f}.",
        "",
        "## Prompt tokens: top-k recall per MoE layer",
        "",
        "| table | " + " | ".join(f"layer {li}" for li in layers) + " | mean |",
        "|---|" + "---:|" * (len(layers) + 1),
    ]
    for name, label in (
        ("dry_run", "router dry run"),
        ("ceiling", "token-id ceiling (in-sample)"),
        ("learned_final_in_sample", "learning table at the end (in-sample)"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in tr[name]) + f" | {np.mean(tr[name]):.3f} |")
    lines.append(
        "| chance | " + " | ".join(f"{doc['chance_recall']:.3f}" for _ in layers) + f" | {doc['chance_recall']:.3f} |"
    )
    lq = doc["learned_prequential_last_quarter"]
    lines += [
        "",
        f"**Learning table, prequential** (each step's rows scored before it learns them) over the last quarter "
        f"of the prompt tokens, after {lq['after_requests']} prompts: recall {lq['recall']:.3f} against the dry run's "
        f"{lq['dry_run_recall']:.3f} on the same tokens; **{100 * lq['share_of_ceiling']:.1f} % of the token-id "
        "ceiling** (goal ≥ 95 %).",
        "",
        "## Per-request histograms (mean over requests, per layer)",
        "",
        "| predicts | from | cosine per layer | top-k overlap per layer |",
        "|---|---|---|---|",
    ]
    for target in ("prompt", "decode"):
        for name, v in doc["histograms"][target].items():
            lines.append(
                f"| {target} | {name} | "
                + " ".join(f"{x:.3f}" for x in v["cosine"])
                + " | "
                + " ".join(f"{x:.3f}" for x in v["topk_overlap"])
                + " |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.predictor_study", description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=Path, default=POOL)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded trained model)")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("sim/results/routing"))
    a = ap.parse_args(argv)
    if not a.pool.exists():
        print(f"no prompt pool at {a.pool}", file=sys.stderr)
        return 2
    from caps_vllm.tiny_model import generate

    model = a.model or str(generate())
    pool = prompt_pool(a.pool)
    rng = np.random.default_rng(a.seed)
    rows = [pool[i] for i in rng.permutation(len(pool))[: a.requests]]
    with tempfile.TemporaryDirectory() as cache:  # a fresh learning table
        run = serve(model, rows, a.max_prompt, a.decode, a.seed, cache)
    doc = analyse(run)
    doc.update(
        requests_asked=a.requests,
        decode_tokens=a.decode,
        wall_s=round(run["wall_s"], 1),
        seed=a.seed,
        held_out_prompts=sum(int(r["id"]) % HELD_OUT_EVERY == 0 for r in rows),
    )
    write_study(a.out, "predictor", doc, report(doc), predictor_figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
