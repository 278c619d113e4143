"""Topic locality of MoE routing, measured the same way on any model's routing.

What CAPS can win on one device is the experts a step does not read: a batch of requests on one
topic shares experts only as much as the model's routing depends on the topic. Two figures say
how much, per MoE layer, computed identically for the embedded model and for the real routing in
``../shared/data/routing`` (so the embedded model can be held to the real models' band):

* **topic skew**: the Jensen-Shannon divergence (bits) of each category's expert distribution
  from the pooled one, weighted by the category's share of tokens (the mutual information of
  category and expert);
* **one topic vs mixed**: distinct experts per layer of a batch of B tokens (one token per
  request, a random position of a random sequence) drawn from one category, against one whose
  tokens each come from a random category.

Real references: ESFT's per-token routing of a DeepSeek-V2-Lite-layout model (26 layers, 64
experts, top-6, four task domains) and OLMoE-1B-7B's per-domain counts at layers 0, 7 and 15
(64 experts, top-8, five text sources). OLMoE's file holds per-token-id counts, not per-token
choices: a token there is a token id drawn by frequency with its 8 experts drawn without
replacement from that id's expert counts (an approximation that ignores what attention adds).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from caps_vllm.routing import counts_from_rows

BATCHES = (4, 8, 16, 32, 64)
#: a sampler: one routing row [layers, top_k] per listed category -> [len, layers, top_k]
Sampler = Callable[[Sequence[str], np.random.Generator], np.ndarray]


def js(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence in bits of two distributions."""
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a, b):
        nz = a > 0
        return float((a[nz] * np.log2(a[nz] / b[nz])).sum())

    return (kl(p, m) + kl(q, m)) / 2


def topic_skew(per_category: np.ndarray) -> float:
    """JS(category ‖ pool) in bits, weighted by tokens, of [categories, experts] counts."""
    per_category = np.asarray(per_category, dtype=np.float64)
    pool = per_category.sum(axis=0)
    w = per_category.sum(axis=1) / per_category.sum()
    return float(sum(wi * js(c, pool) for wi, c in zip(w, per_category) if wi > 0))


def skew_per_layer(counts: dict[str, np.ndarray]) -> list[float]:
    """Topic skew of each layer from each category's [layers, experts] counts."""
    cats = sorted(counts)
    return [topic_skew(np.stack([counts[c][layer] for c in cats])) for layer in range(counts[cats[0]].shape[0])]


def one_topic_vs_mixed(
    sample: Sampler, categories: Sequence[str], experts: int, draws: int = 300, seed: int = 0
) -> list[dict]:
    """Per batch size: distinct experts per layer (mean over layers and draws) one topic vs mixed."""
    rng = np.random.default_rng(seed)
    out = []
    for b in BATCHES:
        one, mixed = [], []
        for _ in range(draws):
            c = categories[int(rng.integers(len(categories)))]
            one.append((counts_from_rows(sample([c] * b, rng), experts) > 0).sum(axis=1))
            mix = [categories[int(i)] for i in rng.integers(len(categories), size=b)]
            mixed.append((counts_from_rows(sample(mix, rng), experts) > 0).sum(axis=1))
        o, m = np.mean(one, axis=0), np.mean(mixed, axis=0)
        out.append(
            {
                "tokens": b,
                "one_topic": float(o.mean()),
                "mixed": float(m.mean()),
                "gap": float(o.mean() / m.mean() - 1),
                "gap_per_layer": (o / m - 1).round(4).tolist(),
            }
        )
    return out


class RowSampler:
    """Tokens of recorded sequences per category: ``sample`` draws a random position of a random
    sequence of each listed category (the embedded model's captured prompts)."""

    def __init__(self, seqs: dict[str, list[np.ndarray]]) -> None:
        self.seqs = {c: [s for s in v if len(s)] for c, v in seqs.items()}

    def sample(self, categories: Sequence[str], rng: np.random.Generator) -> np.ndarray:
        rows = []
        for c in categories:
            seq = self.seqs[c][int(rng.integers(len(self.seqs[c])))]
            rows.append(seq[int(rng.integers(len(seq)))])
        return np.stack(rows)


def esft_reference(path: Path, draws: int = 300, seed: int = 0) -> dict:
    from sim.routing_replay import EsftReplay

    replay = EsftReplay(path)
    counts = {d: replay.row_counts(np.concatenate(replay.seqs[d])) for d in replay.domains}
    return {
        "model": "DeepSeek-V2-Lite layout (ESFT), 64 experts, top-6, shared experts",
        "categories": replay.domains,
        "layers": list(range(replay.layers)),
        "skew": skew_per_layer(counts),
        "one_topic_vs_mixed": one_topic_vs_mixed(replay.sample, replay.domains, replay.experts, draws, seed),
    }


class OlmoeTokens:
    """OLMoE tokens of one recorded layer per domain, drawn from its per-token-id counts."""

    def __init__(self, z, layer: int, top_k: int = 8) -> None:
        self.top_k = top_k
        self.domains = sorted(
            k.split("_")[1] for k in z.files if k.startswith("olmoe_") and k.endswith("_token_expert")
        )
        self.experts = int(z[f"olmoe_{self.domains[0]}_expert_counts"].shape[1])
        self.by_domain = {}
        for d in self.domains:
            t = z[f"olmoe_{d}_token_expert"]
            t = t[t[:, 1] == layer]
            ids, inv = np.unique(t[:, 0], return_inverse=True)
            table = np.zeros((len(ids), self.experts))
            np.add.at(table, (inv, t[:, 2]), t[:, 3])
            keep = (table > 0).sum(axis=1) >= top_k  # ids seen with at least k experts (nearly all mass)
            table = table[keep]
            mass = table.sum(axis=1)
            self.by_domain[d] = (np.cumsum(mass) / mass.sum(), table / mass[:, None])

    def sample(self, categories: Sequence[str], rng: np.random.Generator) -> np.ndarray:
        rows = []
        for c in categories:
            cum, probs = self.by_domain[c]
            i = min(int(np.searchsorted(cum, rng.random())), len(cum) - 1)
            rows.append(rng.choice(self.experts, size=self.top_k, replace=False, p=probs[i]))
        return np.stack(rows)[:, None, :]  # one layer


def olmoe_reference(path: Path, draws: int = 300, seed: int = 0) -> dict:
    z = np.load(path)
    domains = sorted(k.split("_")[1] for k in z.files if k.startswith("olmoe_") and k.endswith("_expert_counts"))
    skew = [topic_skew(np.stack([z[f"olmoe_{d}_expert_counts"][i] for d in domains])) for i in range(3)]
    gaps = []
    for i in range(3):
        tokens = OlmoeTokens(z, i)
        gaps.append(one_topic_vs_mixed(tokens.sample, tokens.domains, tokens.experts, draws, seed))
    per_batch = [
        {
            "tokens": g[0]["tokens"],
            "one_topic": float(np.mean([x["one_topic"] for x in g])),
            "mixed": float(np.mean([x["mixed"] for x in g])),
            "gap": float(np.mean([x["one_topic"] for x in g]) / np.mean([x["mixed"] for x in g]) - 1),
            "gap_per_layer": [x["gap"] for x in g],
        }
        for g in zip(*gaps)
    ]
    return {
        "model": "OLMoE-1B-7B, 64 experts, top-8, no shared experts",
        "categories": domains,
        "layers": [0, 7, 15],
        "skew": skew,
        "one_topic_vs_mixed": per_batch,
    }
