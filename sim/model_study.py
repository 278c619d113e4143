"""The embedded model, trained against untrained: perplexity, expert balance and topic skew.

On the held-out prompts of the pool (every 20th by id, never trained on), both models of the
same shape and tokenizer (the shipped trained one, and the seeded random init it was trained
from) are run with transformers, their own routers' top-k per token and MoE layer recorded:

* **held-out perplexity** (next-token, the language-model loss only);
* **expert load balance** per layer over all held-out tokens: max/mean and coefficient of
  variation of the per-expert load;
* **topic skew** per layer: how much the expert distribution depends on the prompt's category,
  as the Jensen-Shannon divergence (bits) of each category's expert distribution against the
  pooled one, weighted by the category's tokens (the mutual information of category and
  expert), and the mean JS divergence over pairs of categories.

    python -m sim.model_study --out sim/results/routing
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

from caps_vllm.routing import counts_from_rows
from caps_vllm.tiny_model import generate, prompt_pool, untrained
from caps_vllm.train_tiny import pack, perplexity, split
from sim.captured_routing import CapturedRouting
from sim.plots import model_figure, write_study

POOL = Path("../shared/data/prompts/topic_prompts_combined.jsonl")
MIN_PROMPTS = 20  # categories with fewer held-out prompts are left out of the skew


def js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two distributions."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return (kl(p, m) + kl(q, m)) / 2


def routing_figures(model_dir: Path, rows: list[dict], max_tokens: int) -> dict:
    cap = CapturedRouting(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    per_cat: dict[str, np.ndarray] = defaultdict(lambda: np.zeros((cap.layers, cap.experts)))
    for r in rows:
        ids = tok(r["prompt"], add_special_tokens=False)["input_ids"][:max_tokens]
        if ids:
            per_cat[r["category"]] += counts_from_rows(cap.route(ids), cap.experts)
    total = sum(per_cat.values())
    cats = sorted(c for c in per_cat if sum(1 for r in rows if r["category"] == c) >= MIN_PROMPTS)
    mean = total.mean(axis=1, keepdims=True)
    skew, pairwise = [], []
    for layer in range(cap.layers):
        w = np.array([per_cat[c][layer].sum() for c in cats])
        skew.append(float(sum(wi * js(per_cat[c][layer], total[layer]) for wi, c in zip(w / w.sum(), cats))))
        pairs = itertools.combinations(cats, 2)
        pairwise.append(float(np.mean([js(per_cat[a][layer], per_cat[b][layer]) for a, b in pairs])))
    held = pack(tok, rows, 256)
    return {
        "held_out_ppl": perplexity(cap.model, held),
        "max_over_mean": (total.max(axis=1) / mean[:, 0]).round(3).tolist(),
        "cv": (total.std(axis=1) / mean[:, 0]).round(3).tolist(),
        "topic_js_to_pool_bits": np.round(skew, 4).tolist(),
        "topic_js_pairwise_bits": np.round(pairwise, 4).tolist(),
        "categories": cats,
        "tokens": int(total[0].sum() / cap.top_k),
    }


def report(doc: dict) -> str:
    t, u, tr = doc["trained"], doc["untrained"], doc["training"]
    layers = range(len(t["cv"]))
    lines = [
        "# The embedded model: trained vs untrained",
        "",
        f"`python -m caps_vllm.train_tiny` (seed {tr['seed']}, {tr['steps']} steps of "
        f"{tr['batch']}x{tr['seq_len']} tokens "
        f"= {tr['epochs']} epochs of {tr['train_prompts']} prompts, load-balancing loss coefficient "
        f"{tr['router_aux_loss_coef']}, {tr['train_seconds']:.0f} s on this CPU); measured by "
        f"`python -m sim.model_study` on {doc['held_out_prompts']} held-out prompts ({t['tokens']} tokens, "
        f"{len(t['categories'])} categories with ≥ {MIN_PROMPTS} prompts).",
        "",
        f"**Held-out perplexity**: {t['held_out_ppl']:.1f} trained, {u['held_out_ppl']:.1f} untrained "
        f"(vocabulary {doc['vocab']}).",
        "",
        "| per MoE layer | " + " | ".join(f"layer {i}" for i in layers) + " |",
        "|---|" + "---:|" * len(t["cv"]),
    ]
    for key, label in (
        ("max_over_mean", "expert load max/mean"),
        ("cv", "expert load CV"),
        ("topic_js_to_pool_bits", "topic skew: JS(category ‖ pool), bits"),
        ("topic_js_pairwise_bits", "topic skew: JS between categories, bits"),
    ):
        for name, d in (("trained", t), ("untrained", u)):
            lines.append(f"| {label}, {name} | " + " | ".join(f"{v:.3f}" for v in d[key]) + " |")
    lines += [
        "",
        "Training curve (held-out perplexity): "
        + ", ".join(
            f"step {p['step']}: {p['held_out_ppl']:.1f}"
            for p in tr["curve"]
            if "held_out_ppl" in p and (p["step"] in (0, tr["steps"]) or p["step"] % 500 == 0)
        )
        + " (`model.png`).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.model_study", description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=Path, default=POOL)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("sim/results/routing"))
    a = ap.parse_args(argv)
    if not a.pool.exists():
        print(f"no prompt pool at {a.pool}", file=sys.stderr)
        return 2
    trained = generate()
    _, held = split(prompt_pool(a.pool))
    record = json.loads((trained / "caps_model.json").read_text())
    doc = {
        "held_out_prompts": len(held),
        "training": record["training"],
        "vocab": json.loads((trained / "config.json").read_text())["vocab_size"],
    }
    doc["trained"] = routing_figures(trained, held, a.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        doc["untrained"] = routing_figures(
            untrained(Path(tmp) / "untrained", seed=record["training"]["seed"]), held, a.max_tokens
        )
    write_study(a.out, "model", doc, report(doc), model_figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
