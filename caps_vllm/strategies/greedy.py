"""Greedy complement selection: pick, one at a time, the candidate that best complements the load.

All five strategies share one incremental loop. The load after the picks so far is
L = running + sum(picked). Every score below is a function of three per-candidate numbers
(v.L, ||v||^2, sum v) and two load statistics (sum L, ||L||^2); after a pick j only v.L
changes, by the Gram column v.v_j. So the cost is one dot product per candidate up front,
then O(W) per pick with a cached Gram matrix (O(W*d) without one).

On equal-mass candidates the variance and L2-norm scores differ by a constant, so they
pick the same; dot product agrees with them only when the squared norms are equal too
(for example when the vectors are permutations of each other).
"""

from __future__ import annotations

import numpy as np

from caps_vllm.strategies.base import Strategy, Window


class GreedyStrategy(Strategy):
    """Seed with the oldest candidate, then repeatedly add the lowest-scoring one."""

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        assert window is not None
        window.take(0)
        picks = []
        for _ in range(b - 1):
            j = int(self.choose(window))
            picks.append(j)
            window.take(j)
        return picks

    def choose(self, w: Window) -> int:
        return int(self.score(w).argmin())

    def score(self, w: Window) -> np.ndarray:
        """Lower is better; must be +inf where ``w.dots`` is +inf (already picked)."""
        raise NotImplementedError


class GreedyDotProduct(GreedyStrategy):
    """Minimise v.L: the candidate least aligned with the load (Panigrahy et al.'s DotProduct)."""

    name = "greedy_dot_product"
    uses_stats = False

    def score(self, w: Window) -> np.ndarray:
        return w.dots


class NormMinimizing(GreedyStrategy):
    """Minimise ||L + v||^2 = ||L||^2 + 2 v.L + ||v||^2 (the constant ||L||^2 is dropped)."""

    name = "norm_minimizing"

    def score(self, w: Window) -> np.ndarray:
        return 2.0 * w.dots + w.norms


class GreedyVariance(GreedyStrategy):
    """Minimise Var(L + v) over experts: the prototype's original CAPS objective."""

    name = "greedy_variance"

    def score(self, w: Window) -> np.ndarray:
        d = w.d
        mean = (w.load_mass + w.mass) / d
        return (w.load_sq + 2.0 * w.dots + w.norms) / d - mean * mean


class BestFit(GreedyStrategy):
    """Vector bin packing best fit: minimise the distance of L + v to a uniform target level.

    The target is fixed for the whole selection: the per-expert level the load would reach
    if the B admitted requests had the window's mean mass and were perfectly spread. Unlike
    variance (whose reference level moves with each candidate) it prefers candidates that
    fill the gaps below the target and penalises overshooting it.
    """

    name = "best_fit"

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        assert window is not None
        self._target = (window.load_mass + b * float(window.mass.mean())) / window.d
        return super()._pick(vecs, window, b)

    def score(self, w: Window) -> np.ndarray:
        # ||L + v - t||^2 minus the terms that are the same for every candidate.
        return 2.0 * w.dots + w.norms - 2.0 * self._target * w.mass


class Differencing(GreedyStrategy):
    """Minimise v.(L - mean(L)): cancel the load's deviation from its mean, the vector
    analogue of Karmarkar-Karp differencing (and the first-order change of Var(L + v))."""

    name = "differencing"

    def score(self, w: Window) -> np.ndarray:
        return w.dots - (w.load_mass / w.d) * w.mass
