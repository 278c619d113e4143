"""The embedded model, trained against untrained and against real MoE routing.

On the held-out prompts of the pool (every 20th by id, never trained on), both models of the
same shape and tokenizer (the shipped trained one, and the seeded random init it was trained
from) are run with transformers, their own routers' top-k per token and MoE layer recorded:

* **held-out perplexity** (next-token, the language-model loss only);
* **expert load balance** per layer over all held-out tokens: max/mean and coefficient of
  variation of the per-expert load;
* **topic skew** per layer: how much the expert distribution depends on the prompt's category,
  as the Jensen-Shannon divergence (bits) of each category's expert distribution against the
  pooled one, weighted by the category's tokens (the mutual information of category and
  expert), and the mean JS divergence over pairs of categories;
* **one topic vs mixed**: distinct experts per layer of a batch of 4-64 prompt tokens (one per
  request) of one category against a mixed one (:mod:`sim.topic_locality`);
* **the real models' band**: the same two figures on the real routing of ``--routing``
  (DeepSeek-V2-Lite's ESFT routing, OLMoE's per-domain counts), which the trained model is held
  to: its routing should be as topic-specific as a real model's, no more and no less.

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
from sim.topic_locality import RowSampler, esft_reference, js, olmoe_reference, one_topic_vs_mixed, skew_per_layer

POOL = Path("../shared/data/prompts/topic_prompts_combined.jsonl")
ROUTING = Path("../shared/data/routing")
MIN_PROMPTS = 20  # categories with fewer held-out prompts are left out of the skew


def routing_figures(model_dir: Path, rows: list[dict], max_tokens: int) -> dict:
    cap = CapturedRouting(model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    seqs: dict[str, list[np.ndarray]] = defaultdict(list)
    for r in rows:
        ids = tok(r["prompt"], add_special_tokens=False)["input_ids"][:max_tokens]
        if ids:
            seqs[r["category"]].append(cap.route(ids))
    cats = sorted(c for c in seqs if sum(1 for r in rows if r["category"] == c) >= MIN_PROMPTS)
    per_cat = {c: counts_from_rows(np.concatenate(seqs[c]), cap.experts) for c in seqs}
    total = sum(per_cat.values())
    mean = total.mean(axis=1, keepdims=True)
    skew = skew_per_layer({c: per_cat[c] for c in cats})
    pairwise = []
    for layer in range(cap.layers):
        pairs = itertools.combinations(cats, 2)
        pairwise.append(float(np.mean([js(per_cat[a][layer], per_cat[b][layer]) for a, b in pairs])))
    sampler = RowSampler({c: seqs[c] for c in cats})
    held = pack(tok, rows, 256)
    return {
        "held_out_ppl": perplexity(cap.model, held),
        "max_over_mean": (total.max(axis=1) / mean[:, 0]).round(3).tolist(),
        "cv": (total.std(axis=1) / mean[:, 0]).round(3).tolist(),
        "topic_js_to_pool_bits": np.round(skew, 4).tolist(),
        "topic_js_pairwise_bits": np.round(pairwise, 4).tolist(),
        "one_topic_vs_mixed": one_topic_vs_mixed(sampler.sample, cats, cap.experts),
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
    return "\n".join(lines + locality_report(doc))


def _where(v: float, lo: float, hi: float) -> str:
    return "inside" if lo <= v <= hi else ("below" if v < lo else "above")


def locality_report(doc: dict) -> list[str]:
    """The trained model's topic locality beside the real models' band."""
    t, refs, bd = doc["trained"], doc["references"], doc["band"]
    lo, hi = bd["skew"]
    lines = [
        "## Topic locality against real MoE routing",
        "",
        "The same two figures on the real routing of `../shared/data/routing` "
        "(`sim/topic_locality.py`): "
        + "; ".join(
            f"{r['model']}, {len(r['categories'])} categories ({', '.join(r['categories'])}), layers "
            f"{r['layers'][0]}-{r['layers'][-1]}"
            if k == "esft"
            else f"{r['model']}, {len(r['categories'])} categories, layers {', '.join(map(str, r['layers']))}"
            for k, r in refs.items()
        )
        + f". The embedded model: {len(t['categories'])} categories of held-out prompts, prompt tokens. "
        "Batches hold one token per request, a random position of a random sequence; OLMoE's tokens are drawn "
        "from its per-token-id counts (an approximation).",
        "",
        "| topic skew, JS(category ‖ pool), bits | " + " | ".join(f"layer {i}" for i in range(len(t["cv"]))) + " |",
        "|---|" + "---:|" * len(t["cv"]),
        "| embedded model, trained | " + " | ".join(f"{v:.3f}" for v in t["topic_js_to_pool_bits"]) + " |",
        "| real models' band | " + " | ".join(f"{lo:.3f}-{hi:.3f}" for _ in t["cv"]) + " |",
        "| where | " + " | ".join(_where(v, lo, hi) for v in t["topic_js_to_pool_bits"]) + " |",
        "",
        f"Real: ESFT {min(refs['esft']['skew']):.3f}-{max(refs['esft']['skew']):.3f} over its 26 layers, OLMoE "
        + " / ".join(f"{v:.3f}" for v in refs["olmoe"]["skew"])
        + " at layers 0 / 7 / 15.",
        "",
        "| tokens | embedded: one topic | mixed | gap (per layer) | ESFT gap (layers' range) | OLMoE gap (0 / 7 / 15) "
        "| real band | embedded |",
        "|---|---:|---:|---|---|---|---|---|",
    ]
    by_b = {b: [r["one_topic_vs_mixed"][i] for r in refs.values()] for i, b in enumerate(bd["gap"])}
    for g in t["one_topic_vs_mixed"]:
        b = g["tokens"]
        glo, ghi = bd["gap"][b]
        esft, olmoe = by_b[b]
        inside = sum(glo <= v <= ghi for v in g["gap_per_layer"])
        lines.append(
            f"| {b} | {g['one_topic']:.1f} | {g['mixed']:.1f} | {g['gap']:+.1%} "
            f"({', '.join(f'{v:+.1%}' for v in g['gap_per_layer'])}) | "
            f"{esft['gap']:+.1%} ({min(esft['gap_per_layer']):+.1%}…{max(esft['gap_per_layer']):+.1%}) | "
            f"{' / '.join(f'{v:+.1%}' for v in olmoe['gap_per_layer'])} | {glo:+.1%}…{ghi:+.1%} | "
            f"{inside} of {len(g['gap_per_layer'])} layers inside |"
        )
    lines.append("")
    return lines


def band(refs: dict) -> dict:
    """The real models' range per figure: skew over every reference layer, and per batch size the
    one-topic-vs-mixed gap over every reference layer."""
    skews = [v for r in refs.values() for v in r["skew"]]
    gaps: dict[int, list[float]] = defaultdict(list)
    for r in refs.values():
        for g in r["one_topic_vs_mixed"]:
            gaps[g["tokens"]] += g["gap_per_layer"]
    return {
        "skew": [min(skews), max(skews)],
        "gap": {b: [min(v), max(v)] for b, v in sorted(gaps.items())},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.model_study", description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=Path, default=POOL)
    ap.add_argument("--routing", type=Path, default=ROUTING, help="the shared real routing (esft, olmoe files)")
    ap.add_argument(
        "--model", type=Path, default=None, help="a trained checkpoint to measure (default: the shipped one)"
    )
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("sim/results/routing"))
    a = ap.parse_args(argv)
    if not a.pool.exists():
        print(f"no prompt pool at {a.pool}", file=sys.stderr)
        return 2
    files = {"esft": a.routing / "esft_routing.npz", "olmoe": a.routing / "olmoe_routing_stats.npz"}
    if not all(f.exists() for f in files.values()):
        print(f"no real routing at {a.routing} (esft_routing.npz, olmoe_routing_stats.npz)", file=sys.stderr)
        return 2
    trained = a.model or generate()
    _, held = split(prompt_pool(a.pool))
    record = json.loads((trained / "caps_model.json").read_text())
    doc = {
        "command": "python -m sim.model_study " + " ".join(sys.argv[1:] if argv is None else argv),
        "held_out_prompts": len(held),
        "training": record["training"],
        "vocab": json.loads((trained / "config.json").read_text())["vocab_size"],
    }
    doc["trained"] = routing_figures(trained, held, a.max_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        doc["untrained"] = routing_figures(
            untrained(Path(tmp) / "untrained", seed=record["training"]["seed"]), held, a.max_tokens
        )
    doc["references"] = {"esft": esft_reference(files["esft"]), "olmoe": olmoe_reference(files["olmoe"])}
    doc["band"] = band(doc["references"])
    write_study(a.out, "model", doc, report(doc), model_figure)
    return 0


if __name__ == "__main__":
    sys.exit(main())
