"""Routing of every token the twin simulates, and the vectors CAPS is given to predict it.

``EsftReplay`` replays what a DeepSeek-V2-Lite-layout model (26 MoE layers, 64 experts, top-6)
routed for real sequences of four task domains (``../shared/data/routing/esft_routing.npz``,
from deepseek-ai/ESFT): a simulated request of domain D is bound to one recorded sequence of D,
and its token at position p (prompt or decode) takes that sequence's routing at p (wrapping
around past its end). A step's per-expert counts are the sum over the tokens it schedules.

CAPS's vector for a request (what its predictor would say of the prompt) is the prompt's true
per-layer expert counts, or a *noisy oracle*: every routed (token, layer) keeps its true experts
with probability q and is re-drawn uniformly otherwise, q chosen so that the expected top-k
recall is the stated one (``recall``; the token-id ceiling measured on OLMoE is 0.59-0.78,
chance k / E).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caps_vllm.routing import counts_from_rows


class EsftReplay:
    expected = False  # counts are realised token counts, not expectations

    def __init__(self, path: str | Path, seed: int = 0) -> None:
        z = np.load(path)
        self.domains = sorted(k[: -len("_experts")] for k in z.files if k.endswith("_experts"))
        if not self.domains:
            raise ValueError(f"{path}: no '<domain>_experts' arrays")
        self.seqs: dict[str, list[np.ndarray]] = {}
        for d in self.domains:
            e, lens = z[f"{d}_experts"], z[f"{d}_seq_lens"]
            off = np.r_[0, np.cumsum(lens)]
            self.seqs[d] = [e[off[i] : off[i + 1]].astype(np.int64) for i in range(len(lens))]
        first = self.seqs[self.domains[0]][0]
        self.layers, self.top_k = int(first.shape[1]), int(first.shape[2])
        self.experts = int(max(int(s.max()) for d in self.domains for s in self.seqs[d])) + 1
        self.rng = np.random.default_rng(seed)
        self.bound: dict[str, np.ndarray] = {}  # request id -> its recorded sequence

    def bind(self, rid: str, domain: str) -> None:
        """Give request ``rid`` one recorded sequence of ``domain`` (seeded choice)."""
        pool = self.seqs.get(domain)
        if pool is None:
            raise ValueError(f"domain {domain!r}; the replay has {', '.join(self.domains)}")
        self.bound[rid] = pool[int(self.rng.integers(len(pool)))]

    def rows(self, rid: str, start: int, n: int) -> np.ndarray:
        """Routing of the request's tokens start .. start + n - 1: [n, layers, top_k]."""
        seq = self.bound[rid]
        return seq[np.arange(start, start + n) % len(seq)]

    def counts(self, spans: list[tuple[str, int, int]]) -> np.ndarray:
        """Per-layer expert counts [layers, experts] of a step's (request, start, n) spans."""
        rows = [self.rows(rid, s, n) for rid, s, n in spans if n > 0]
        if not rows:
            return np.zeros((self.layers, self.experts))
        return self.row_counts(np.concatenate(rows)).astype(np.float64)

    def row_counts(self, rows: np.ndarray) -> np.ndarray:
        """[layers, experts] counts of [tokens, layers, top_k] routing rows."""
        return counts_from_rows(rows, self.experts)

    def sample(self, domains: list[str], rng: np.random.Generator) -> np.ndarray:
        """[len(domains), layers, top_k]: one recorded token of each listed domain, a random
        position of a random sequence."""
        rows = []
        for d in domains:
            seq = self.seqs[d][int(rng.integers(len(self.seqs[d])))]
            rows.append(seq[int(rng.integers(len(seq)))])
        return np.stack(rows)

    def static_bound(self, tokens: int, draws: int = 200, seed: int = 0) -> dict:
        """The dispatch bound: distinct experts per layer of a decode batch of ``tokens`` recorded
        tokens all of one domain, against one drawn across the domains (each token a random
        position of a random sequence), averaged over ``draws`` batches."""
        rng = np.random.default_rng(seed)
        tokens = max(1, int(round(tokens)))

        def distinct(domain_of) -> float:
            total = 0.0
            for _ in range(draws):
                total += (self.row_counts(self.sample(domain_of(), rng)) > 0).sum(axis=1).mean()
            return total / draws

        doms = self.domains
        one = np.mean([distinct(lambda d=d: [d] * tokens) for d in doms])
        mixed = distinct(lambda: [doms[int(i)] for i in rng.integers(len(doms), size=tokens)])
        return {"tokens": tokens, "one_domain": float(one), "mixed": float(mixed), "ratio": float(one / mixed)}

    def prompt_vector(
        self, rid: str, prompt_len: int, recall: float = 1.0, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """CAPS's vector for the request: its prompt's per-layer counts, flattened (layers x
        experts); with ``recall`` < 1, the noisy oracle described above."""
        rows = self.rows(rid, 0, prompt_len).copy()
        chance = self.top_k / self.experts
        if recall < 1.0:
            if not chance <= recall <= 1.0:
                raise ValueError(f"oracle recall {recall}; valid: {chance:.3f} (chance) to 1")
            q = (recall - chance) / (1.0 - chance)
            rng = rng or self.rng
            redraw = rng.random(rows.shape[:2]) >= q
            m = int(redraw.sum())
            if m:  # k distinct experts, uniformly: the first k of a random permutation
                rows[redraw] = np.argsort(rng.random((m, self.experts)), axis=1)[:, : self.top_k]
        return self.row_counts(rows).ravel().astype(np.float64)


class SkewedRouting:
    """Synthetic routing for shapes without recorded routing (Qwen3-30B-A3B's 128 experts,
    a DeepSeek-V3-like 256): each domain has, per MoE layer, an expert popularity drawn from
    Dirichlet(alpha); a token of domain d routes its k choices in proportion to it. Steps get
    *expected* counts (k x popularity per token, touched with probability 1 - exp(-count)).
    ``alpha`` is fitted so that a mixed-domain batch of ``mid_tokens`` tokens touches
    ``target`` x the distinct experts of uniform routing -- an ASSUMPTION taken from what is
    published (LLMServingSim, Qwen3-30B-A3B: real gates touch about 0.87x uniform's distinct
    experts at mid batch, 0.94x at saturated decode), stated in every result that uses it."""

    expected = True

    def __init__(
        self,
        layers: int,
        experts: int,
        top_k: int,
        domains: list[str],
        target: float = 0.87,
        mid_tokens: int = 32,
        seed: int = 0,
    ) -> None:
        self.layers, self.experts, self.top_k, self.domains = layers, experts, top_k, list(domains)
        self.seed, self.target, self.mid_tokens = seed, target, mid_tokens
        self.alpha = self._fit()
        self.profile = self._profiles(self.alpha)  # [domains, layers, experts], rows sum to 1
        self.domain_of: dict[str, int] = {}

    def _profiles(self, alpha: float) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        return rng.dirichlet(np.full(self.experts, alpha), size=(len(self.domains), self.layers))

    def distinct_ratio(self, profile: np.ndarray, tokens: int) -> float:
        """Distinct experts of ``tokens`` tokens spread evenly over the domains, against uniform."""
        m = tokens / len(self.domains) * self.top_k * profile.sum(axis=0)
        uniform = self.experts * -np.expm1(-tokens * self.top_k / self.experts)
        return float((-np.expm1(-m)).sum(axis=-1).mean() / uniform)

    def _fit(self) -> float:
        lo, hi = 1e-3, 1e3  # distinct experts grow with alpha (flatter popularity)
        for _ in range(40):
            mid = (lo * hi) ** 0.5
            if self.distinct_ratio(self._profiles(mid), self.mid_tokens) < self.target:
                lo = mid
            else:
                hi = mid
        return (lo * hi) ** 0.5

    def bind(self, rid: str, domain: str) -> None:
        if domain not in self.domains:
            raise ValueError(f"domain {domain!r}; the synthetic routing has {', '.join(self.domains)}")
        self.domain_of[rid] = self.domains.index(domain)

    def counts(self, spans: list[tuple[str, int, int]]) -> np.ndarray:
        per_domain = np.zeros(len(self.domains))
        for rid, _, n in spans:
            per_domain[self.domain_of[rid]] += n
        return self.top_k * np.tensordot(per_domain, self.profile, axes=1)

    def prompt_vector(self, rid: str, prompt_len: int, recall: float = 1.0, rng=None) -> np.ndarray:
        """The prompt's expected counts (CAPS told the request's domain: an oracle)."""
        return (self.top_k * prompt_len * self.profile[self.domain_of[rid]]).ravel()
