"""Randomised strategies: uniform sampling and the power of d choices.

They draw from the strategy's own seeded generator, so a run is reproducible for a seed.
"""

from __future__ import annotations

import numpy as np

from caps_vllm.strategies.base import Strategy, Window
from caps_vllm.strategies.greedy import GreedyDotProduct, GreedyVariance


class RandomSample(Strategy):
    """Oldest first, the rest drawn uniformly: how much of the gain is just shuffling?"""

    name = "random"
    uses_window = False

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        return list(self.rng.choice(np.arange(1, vecs.shape[0]), size=b - 1, replace=False))


class _PowerOfD:
    """Mixin: score only ``sample`` random remaining candidates per pick (Mitzenmacher)."""

    def __init__(self, seed: int = 0, sample: int = 8) -> None:
        if isinstance(sample, bool) or not isinstance(sample, int) or sample < 1:
            raise ValueError(f"power-of-d sample must be an integer >= 1, got {sample!r}")
        super().__init__(seed)  # type: ignore[call-arg]
        self.sample = sample

    def choose(self, w: Window) -> int:
        remaining = np.flatnonzero(np.isfinite(w.dots))
        drawn = remaining[self.rng.permutation(remaining.size)[: self.sample]]
        scores = self.score(w)[drawn]  # type: ignore[attr-defined]
        return int(drawn[np.argmin(scores)])


class PowerOfD(_PowerOfD, GreedyVariance):
    """Sample d candidates, admit the one that minimises Var(L + v)."""

    name = "power_of_d"


class PowerOfDDot(_PowerOfD, GreedyDotProduct):
    """Sample d candidates, admit the one least aligned with the load (min v.L)."""

    name = "power_of_d_dot"
