"""Per-token routing with topic locality for shapes that have no recorded per-token trace.

No licensed per-token routing of Qwen3-30B-A3B, OLMoE, Qwen1.5-MoE or DeepSeek-V3 is at hand;
the shared OLMoE statistics (Apache-2.0: per domain, how often each token id went to each expert
at layers 0, 7 and 15 of OLMoE-1B-7B) are. :class:`TopicTokens` draws a request's tokens from
them: each token is a token id drawn by its frequency in the request's domain, and in every MoE
layer its ``top_k`` experts are drawn without replacement from that id's expert distribution at
the recorded layer nearest in relative depth. So a request's routing carries its topic (the
domain's ids and their experts), the same id routes alike across layers, and its decode tokens
are fresh draws: the prompt predicts the decode routing only through the topic, as measured on
real models (top-4 overlap 0.12-0.20). Mapped onto other shapes (ASSUMPTIONS, stated with every
result): with fewer than 64 experts the id's distribution is restricted to the first ``experts``;
with ``r`` x 64 experts each (id, expert) pair is split to one of its ``r`` children, fixed per id.

:class:`EsftRequests` gives the same interface over the real DeepSeek-V2-Lite-layout routing
(``EsftReplay``): a request's prompt is the first half of a recorded sequence, its decode the
rest (wrapping past the end).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from caps_vllm.routing import counts_from_rows
from sim.routing_replay import EsftReplay

#: the project's prompt categories (loadtest/data/prompts) -> the OLMoE statistics' domains
OLMOE_DOMAIN = {
    **dict.fromkeys(
        ("math", "physics", "chemistry", "biology", "engineering", "math_word_problem", "computer science"), "arxiv"
    ),
    "coding": "github",
    **dict.fromkeys(
        (
            "history",
            "geography",
            "politics",
            "culture",
            "law",
            "economics",
            "business",
            "philosophy",
            "psychology",
            "health",
        ),
        "wikipedia",
    ),
}
RECORDED_DEPTH = (0.0, 7 / 15, 1.0)  # OLMoE's layers 0, 7, 15 of 16


class RequestRouting:
    """Routing rows bound per request; what the twin's step model and CAPS's vectors read."""

    expected = False  # realised token counts

    layers: int
    experts: int
    top_k: int
    domains: list[str]

    def __init__(self) -> None:
        self.bound: dict[str, tuple[np.ndarray, int]] = {}  # rid -> (rows [tokens, layers, k], prompt length)

    def rows(self, rid: str, start: int, n: int) -> np.ndarray:
        seq, _ = self.bound[rid]
        return seq[np.arange(start, start + n) % len(seq)]

    def counts(self, spans: list[tuple[str, int, int]]) -> np.ndarray:
        rows = [self.rows(rid, s, n) for rid, s, n in spans if n > 0]
        if not rows:
            return np.zeros((self.layers, self.experts))
        return counts_from_rows(np.concatenate(rows), self.experts).astype(np.float64)

    def vector(self, rid: str, decode: bool, output_tokens: int) -> np.ndarray:
        """Per-token load (layers x experts, flattened): the prompt's (what CAPS's predictor
        sees), or with ``decode`` the request's own decode tokens' (the oracle)."""
        _, p = self.bound[rid]
        start, n = (p, max(1, output_tokens)) if decode else (0, p)
        return counts_from_rows(self.rows(rid, start, n), self.experts).ravel() / n


class TopicTokens(RequestRouting):
    """Token-level routing drawn from the OLMoE per-token-id statistics (see the module)."""

    def __init__(self, path: str | Path, layers: int, experts: int, top_k: int, seed: int = 0) -> None:
        super().__init__()
        if top_k > experts:
            raise ValueError(f"top_k {top_k} > experts {experts}")
        if experts > 64 and experts % 64:
            raise ValueError(f"experts {experts}: the mapping needs fewer than 64 or a multiple of 64")
        self.layers, self.experts, self.top_k, self.seed = layers, experts, top_k, seed
        z = np.load(path)
        self.domains = sorted(
            k.split("_")[1] for k in z.files if k.startswith("olmoe_") and k.endswith("_token_expert")
        )
        if not self.domains:
            raise ValueError(f"{path}: no olmoe_<domain>_token_expert arrays")
        self.split = max(1, experts // 64)
        depth = np.arange(layers) / max(1, layers - 1)
        self.recorded = np.abs(depth[:, None] - np.array(RECORDED_DEPTH)[None, :]).argmin(axis=1)
        self.tables = {d: self._table(z[f"olmoe_{d}_token_expert"], seed) for d in self.domains}

    def _table(self, t: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(cumulative id mass, log-probabilities [3, ids, parents], child offset [3, ids, parents])
        over the ids seen with at least ``top_k`` experts at every recorded layer."""
        ids = np.unique(t[:, 0])
        table = np.zeros((3, len(ids), 64))
        np.add.at(table, (t[:, 1], np.searchsorted(ids, t[:, 0]), t[:, 2]), t[:, 3])
        parents = min(64, self.experts)
        table = table[:, :, :parents] + 1e-9  # fewer experts: the first ones, every one reachable
        keep = ((table > 1e-6).sum(axis=2) >= min(self.top_k, parents)).all(axis=0)
        table = table[:, keep]
        mass = table[0].sum(axis=1)
        logp = np.log(table / table.sum(axis=2, keepdims=True))
        child = np.random.default_rng([seed, len(ids)]).integers(self.split, size=table.shape, dtype=np.int16)
        return np.cumsum(mass) / mass.sum(), logp, child

    def bind(self, rid: str, domain: str, prompt_len: int, output_tokens: int, key: int) -> None:
        """Draw the request's ``prompt_len + output_tokens`` tokens (seeded by ``key``)."""
        if domain not in self.tables:
            raise ValueError(f"domain {domain!r}; the OLMoE statistics have {', '.join(self.domains)}")
        cum, logp, child = self.tables[domain]
        rng = np.random.default_rng([self.seed, key])
        n = prompt_len + max(1, output_tokens)
        tok = np.minimum(np.searchsorted(cum, rng.random(n)), len(cum) - 1)
        rows = np.empty((n, self.layers, self.top_k), dtype=np.int16)
        for layer in range(self.layers):
            rec = self.recorded[layer]
            g = logp[rec, tok] - np.log(-np.log(rng.random((n, logp.shape[2]))))  # Gumbel top-k
            parent = np.argpartition(-g, self.top_k - 1, axis=1)[:, : self.top_k]
            rows[:, layer] = parent * self.split + child[rec, tok[:, None], parent]
        self.bound[rid] = (rows, prompt_len)


class EsftRequests(RequestRouting):
    """The real DeepSeek-V2-Lite-layout routing: a recorded sequence per request."""

    def __init__(self, path: str | Path, seed: int = 0) -> None:
        super().__init__()
        self.replay = EsftReplay(path, seed)
        self.layers, self.experts, self.top_k = self.replay.layers, self.replay.experts, self.replay.top_k
        self.domains = self.replay.domains
        self.seed = seed

    def _sequence(self, domain: str, key: int) -> np.ndarray:
        """The recorded sequence request ``key`` of ``domain`` replays (seeded)."""
        pool = self.replay.seqs[domain]
        return pool[int(np.random.default_rng([self.seed, key]).integers(len(pool)))]

    def prompt_len(self, domain: str, key: int) -> int:
        return max(1, len(self._sequence(domain, key)) // 2)

    def bind(self, rid: str, domain: str, prompt_len: int, output_tokens: int, key: int) -> None:
        self.bound[rid] = (self._sequence(domain, key), prompt_len)
