"""A token -> experts table that learns from the routing the model actually does.

The router dry run sees a token's embedding only, so past the first layer it guesses; the
workers' capture already counts what every router chose. This table keeps, for up to
``max_tokens`` token ids, exponentially decayed counts of the experts each layer sent that
token to, and predicts a token's top-k per layer from those counts plus the dry run as a prior
(``prior_weight`` pseudo-observations), so an unseen token is predicted exactly as before and a
seen one converges to its most frequent experts: the best any token-id table can do.

Bounded: ``max_tokens x layers x experts`` float32 counts, fixed at start; when every slot is
taken, the eighth with the least decayed mass is evicted (those tokens fall back to the prior).
Each update costs O(rows x layers x (k + experts)), never O(table). Decay is a growing
increment (renormalised when it gets large), so no step touches every count. ``snapshot`` and
``load`` keep the state in the cache folder, versioned by the model's fingerprint: a state of
another model, shape or format is ignored with a warning and the dry run is used.

Pure numpy: the scheduler feeds it, the tests and the simulator use it as it is.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("caps_vllm.learned_table")

STATE_FORMAT = 1
_RESCALE_AT = 1e6


@dataclass
class Recall:
    """Top-k recall of the tables on rows they had not learned from yet (prequential)."""

    picks: int = 0  # (token, layer, k) choices seen
    learned_hits: int = 0  # ... that the learned table had in its top-k before learning them
    prior_hits: int = 0  # ... that the dry run had

    def add(self, picks: int, learned: int, prior: int) -> None:
        self.picks += picks
        self.learned_hits += learned
        self.prior_hits += prior


def topk_hits(table: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[tokens, layers, top_k] bools: whether each routed pick in ``rows`` is among the experts
    ``table`` predicts for its token id (the numerator of top-k recall)."""
    pred = table[ids].astype(np.int64)
    return (pred[:, :, :, None] == np.asarray(rows, dtype=np.int64)[:, :, None, :]).any(axis=2)


class LearnedTable:
    """Online per-token expert counts over a dry-run prior; ``table`` is the current top-k."""

    def __init__(
        self,
        prior: np.ndarray,
        num_experts: int,
        max_tokens: int = 8192,
        half_life_tokens: float = 2e6,
        prior_weight: float = 2.0,
    ) -> None:
        if prior.ndim != 3:
            raise ValueError(f"prior must be [vocab, layers, top_k], got shape {prior.shape}")
        if max_tokens < 8 or half_life_tokens <= 0 or prior_weight < 0:
            raise ValueError("max_tokens >= 8, half_life_tokens > 0 and prior_weight >= 0 are required")
        self.prior = prior
        self.vocab, self.layers, self.top_k = prior.shape
        self.num_experts = num_experts
        self.max_tokens = min(int(max_tokens), self.vocab)
        self.half_life_tokens = float(half_life_tokens)
        self.prior_weight = float(prior_weight)
        self.table = prior.copy()
        self.slot = np.full(self.vocab, -1, dtype=np.int32)  # token -> row of counts
        self.owner = np.full(self.max_tokens, -1, dtype=np.int64)  # row -> token
        self.counts = np.zeros((self.max_tokens, self.layers, num_experts), dtype=np.float32)
        self.mass = np.zeros(self.max_tokens, dtype=np.float64)  # decayed rows learned, per slot
        self.scale = 1.0  # weight of the next observation (decay as a growing increment)
        self.used = 0
        self.rows_learned = 0
        self.evicted = 0
        self.recall = Recall()
        self._tie_break = (np.arange(num_experts, dtype=np.float32) * 1e-6)[None, None, :]

    @property
    def bytes(self) -> int:
        return self.counts.nbytes + self.mass.nbytes + self.owner.nbytes + self.slot.nbytes + self.table.nbytes

    def observe(self, token_ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Learn ``rows`` [t, layers, top_k] routed for ``token_ids`` [t]; returns the tokens whose
        top-k changed (the predictor's rows to refresh). Rows of unknown token ids are skipped."""
        ids = np.asarray(token_ids, dtype=np.int64)
        rows = np.asarray(rows)
        if rows.shape != (len(ids), self.layers, self.top_k):
            raise ValueError(f"rows must be [{len(ids)}, {self.layers}, {self.top_k}], got {rows.shape}")
        ok = (ids >= 0) & (ids < self.vocab)
        ids, rows = ids[ok], rows[ok].astype(np.int64)
        if ids.size == 0:
            return ids
        self._score(ids, rows)
        uniq = np.unique(ids)
        row_slot = self._slots(uniq)[np.searchsorted(uniq, ids)]
        if (row_slot < 0).any():  # more new tokens in one batch than the table holds
            ids, rows, row_slot = ids[row_slot >= 0], rows[row_slot >= 0], row_slot[row_slot >= 0]
            uniq = np.unique(ids)
        w = self.scale
        layer = np.arange(self.layers)[None, :, None]
        flat = (row_slot[:, None, None] * self.layers + layer) * self.num_experts + rows
        np.add.at(self.counts.reshape(-1), flat.ravel(), np.float32(w))
        np.add.at(self.mass, row_slot, w)
        self.rows_learned += len(ids)
        self.scale *= 2.0 ** (len(ids) / self.half_life_tokens)
        if self.scale > _RESCALE_AT:
            self.counts /= self.scale
            self.mass /= self.scale
            self.scale = 1.0
        return self._refresh(uniq)

    def _score(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Prequential recall: how many routed picks each table had before learning them."""
        self.recall.add(
            rows.size, int(topk_hits(self.table, ids, rows).sum()), int(topk_hits(self.prior, ids, rows).sum())
        )

    def _slots(self, tokens: np.ndarray) -> np.ndarray:
        """Rows of ``tokens`` (sorted, unique), allocating (and evicting) where needed."""
        slots = self.slot[tokens]
        new = tokens[slots < 0]
        if new.size:
            free = self.max_tokens - self.used
            if new.size > free:
                self._evict(new.size - free, keep=tokens)
            take = np.flatnonzero(self.owner < 0)[: new.size]
            new = new[: take.size]  # more new tokens in one batch than slots: the first ones
            self.slot[new] = take
            self.owner[take] = new
            self.used += take.size
            slots = self.slot[tokens]
        return slots

    def _evict(self, need: int, keep: np.ndarray) -> None:
        """Free at least ``need`` slots (and an eighth of the table, so eviction stays rare)."""
        mass = self.mass.copy()
        mass[self.owner < 0] = np.inf
        protected = self.slot[keep]
        mass[protected[protected >= 0]] = np.inf
        n = min(max(need, self.max_tokens // 8), int(np.isfinite(mass).sum()))
        if n <= 0:
            return
        victims = np.argpartition(mass, n - 1)[:n]
        tokens = self.owner[victims]
        self.slot[tokens] = -1
        self.owner[victims] = -1
        self.counts[victims] = 0
        self.mass[victims] = 0
        self.table[tokens] = self.prior[tokens]
        self.used -= n
        self.evicted += n

    def scores(self, tokens: np.ndarray) -> np.ndarray:
        """[tokens, layers, experts]: decayed counts in units of one current observation, plus the prior."""
        out = np.zeros((len(tokens), self.layers, self.num_experts), dtype=np.float32)
        slots = self.slot[tokens]
        have = slots >= 0
        out[have] = self.counts[slots[have]] * np.float32(1.0 / self.scale)
        pri = self.prior[tokens].astype(np.int64)
        np.put_along_axis(out, pri, np.take_along_axis(out, pri, axis=2) + np.float32(self.prior_weight), axis=2)
        return out

    def _refresh(self, tokens: np.ndarray) -> np.ndarray:
        sc = self.scores(tokens)
        sc -= self._tie_break  # exact ties go to the lower expert id
        # argpartition: O(experts) per row, not a sort (the bulk of an update at Qwen1.5-MoE shape)
        top = np.argpartition(-sc, self.top_k - 1, axis=2)[:, :, : self.top_k]
        top = np.sort(top, axis=2).astype(self.table.dtype)
        old = np.sort(self.table[tokens], axis=2)
        changed = (top != old).any(axis=(1, 2))
        self.table[tokens[changed]] = top[changed]
        return tokens[changed]

    # --- persistence --------------------------------------------------------------------------

    def state(self, fingerprint: str) -> dict[str, np.ndarray]:
        """A copy of everything learned (the used slots only), for ``save`` off the step thread."""
        live = np.flatnonzero(self.owner >= 0)
        return {
            "format": np.array(STATE_FORMAT),
            "fingerprint": np.array(fingerprint),
            "shape": np.array([self.vocab, self.layers, self.top_k, self.num_experts]),
            "tokens": self.owner[live].copy(),
            "counts": (self.counts[live] / self.scale).astype(np.float32),
            "mass": self.mass[live] / self.scale,
            "stats": np.array(
                [self.rows_learned, self.evicted, self.recall.picks, self.recall.learned_hits, self.recall.prior_hits],
                dtype=np.int64,
            ),
        }

    @staticmethod
    def save(state: dict[str, np.ndarray], path: Path) -> None:
        """Write a ``state`` atomically (a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **state)
        os.replace(tmp, path)

    def load(self, path: Path, fingerprint: str) -> bool:
        """Resume from ``path`` if it is this model's state; otherwise keep the prior (False)."""
        path = Path(path)
        if not path.exists():
            return False
        try:
            with np.load(path, allow_pickle=False) as z:
                st = {k: z[k] for k in z.files}
            problem = None
            if int(st["format"]) != STATE_FORMAT:
                problem = f"format {int(st['format'])}, this version reads {STATE_FORMAT}"
            elif str(st["fingerprint"]) != fingerprint:
                problem = f"it belongs to another model (fingerprint {st['fingerprint']}, this one {fingerprint})"
            elif tuple(st["shape"]) != (self.vocab, self.layers, self.top_k, self.num_experts):
                mine = (self.vocab, self.layers, self.top_k, self.num_experts)
                problem = f"shape {tuple(st['shape'])}, this model {mine}"
        except (OSError, ValueError, KeyError) as exc:
            problem = f"unreadable ({exc})"
        if problem:
            logger.warning(
                "CAPS learned routing table %s ignored: %s; predicting with the router dry run", path, problem
            )
            return False
        tokens = st["tokens"].astype(np.int64)
        order = np.argsort(-st["mass"], kind="stable")[: self.max_tokens]  # a smaller bound keeps the heaviest
        tokens = tokens[order]
        n = len(tokens)
        self.slot[:] = -1
        self.owner[:] = -1
        self.counts[:] = 0
        self.mass[:] = 0
        self.slot[tokens] = np.arange(n)
        self.owner[:n] = tokens
        self.counts[:n] = st["counts"][order]
        self.mass[:n] = st["mass"][order]
        self.scale, self.used = 1.0, n
        self.rows_learned, self.evicted, picks, learned, prior = (int(x) for x in st["stats"])
        self.recall = Recall(picks, learned, prior)
        self.table = self.prior.copy()
        self._refresh(np.sort(tokens))
        logger.info(
            "CAPS learned routing table resumed from %s: %d tokens, %d rows learned", path, n, self.rows_learned
        )
        return True
