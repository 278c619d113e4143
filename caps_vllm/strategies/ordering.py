"""Strategies that order by age or by request size rather than by expert complement."""

from __future__ import annotations

import heapq

import numpy as np

from caps_vllm.strategies.base import Strategy, Window
from caps_vllm.strategies.greedy import GreedyVariance


def _heaviest(mass: np.ndarray, count: int) -> list[int]:
    """Indices 1.. of the ``count`` heaviest candidates, heaviest first, ties by age."""
    rest = np.arange(1, mass.shape[0])
    order = rest[np.lexsort((rest, -mass[1:]))]
    return list(order[:count])


class FCFS(Strategy):
    """First come, first served: the baseline every other strategy is measured against."""

    name = "fcfs"
    uses_window = False

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        return list(range(1, b))


class LPT(Strategy):
    """Longest processing time first: admit the heaviest requests (ignores expert balance)."""

    name = "lpt"
    uses_window = False

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        return _heaviest(vecs.sum(axis=1), b - 1)


class LPTBalanced(GreedyVariance):
    """LPT shortlist, balanced choice: of the 2(B-1) heaviest, greedily minimise variance.

    Heavy requests are served early (LPT's point) while the expert balance is still
    optimised among them.
    """

    name = "lpt_balanced"

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        assert window is not None
        outside = np.ones(vecs.shape[0], dtype=bool)
        outside[[0, *_heaviest(window.mass, 2 * (b - 1))]] = False
        window.dots[outside] = np.inf  # never picked, as if already taken
        return super()._pick(vecs, window, b)


class KarmarkarKarp(Strategy):
    """Scalar balanced largest differencing (BLDM) on request mass.

    Splits the window into k = ceil(W/B) groups of at most B requests whose total masses
    are as equal as differencing makes them, then admits the group holding the oldest
    request, topped up in age order when the group is smaller than B (no slot is left
    empty while requests wait). It balances request *sizes*, not expert loads, which is
    why it is a baseline.
    """

    name = "karmarkar_karp"
    uses_window = False

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        mass = vecs.sum(axis=1)
        w = mass.shape[0]
        k = -(-w // b)
        order = sorted(range(w), key=lambda i: (-mass[i], i))
        order += [-1] * (-w % k)  # dummies of mass 0 so every tuple has k items
        heap: list[tuple[float, int, list[tuple[float, list[int]]]]] = []
        for n, start in enumerate(range(0, len(order), k)):
            parts = [(float(mass[i]) if i >= 0 else 0.0, [i] if i >= 0 else []) for i in order[start : start + k]]
            heapq.heappush(heap, self._entry(parts, n))
        tie = len(heap)
        while len(heap) > 1:
            _, _, a = heapq.heappop(heap)
            _, _, c = heapq.heappop(heap)
            # Largest sums of one tuple meet the smallest of the other: the difference shrinks.
            merged = [(sa + sc, ia + ic) for (sa, ia), (sc, ic) in zip(a, reversed(c))]
            tie += 1
            heapq.heappush(heap, self._entry(merged, tie))
        group = sorted(next(ids for _, ids in heap[0][2] if 0 in ids))
        chosen = set(group)
        return group[1:] + [i for i in range(1, w) if i not in chosen][: b - len(group)]

    @staticmethod
    def _entry(parts: list[tuple[float, list[int]]], tie: int):
        parts.sort(key=lambda p: -p[0])
        return (-(parts[0][0] - parts[-1][0]), tie, parts)
