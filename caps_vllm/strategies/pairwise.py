"""Pairwise dot products of a changing set of load vectors, kept up to date incrementally.

The greedy strategies need v_i.v_j for the window's candidates. Recomputing the window's
Gram matrix at every scheduling step costs O(W^2 d) (about 9 ms for W=256, d=1440 here);
keeping it as requests come and go costs O(n d) per arrival, paid once, and lets each
selection make its picks in O(W). A strategy whose scores start from a per-candidate
transform of its vector (``Strategy.row_terms``: step_cost's touched probabilities
1 - exp(-v), a transcendental per entry) has it kept here too, computed once per request; one
that never reads the dot products (step_cost) keeps no Gram matrix (``gram=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import numpy as np

from caps_vllm.strategies.base import check_loads


class PairwiseCache:
    """Load vectors by key, with their Gram matrix; add is O(n*d), remove O(n)."""

    def __init__(
        self,
        d: int,
        capacity: int = 64,
        terms: Callable[[np.ndarray], np.ndarray] | None = None,
        gram: bool = True,
    ) -> None:
        """``terms``: a row-wise transform of the vectors to keep beside them (see :meth:`terms`);
        ``gram``: whether to keep the pairwise dot products (False: :meth:`window` gives None)."""
        self.d = d
        self._vecs = np.zeros((capacity, d))
        self._gram = np.zeros((capacity, capacity)) if gram else None
        self._terms_of = terms
        self._terms = np.zeros((capacity, d)) if terms is not None else None
        self._slot: dict[Hashable, int] = {}
        self._keys: list[Hashable] = []

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot

    def add(self, key: Hashable, vec: np.ndarray) -> None:
        """Validate ``vec`` once and store it with its dot products with every stored vector."""
        self.add_many([key], [vec])

    def add_many(self, keys: Sequence[Hashable], vecs: Sequence[np.ndarray]) -> None:
        """Add several vectors with one matrix product (a key already present is replaced)."""
        if not keys:
            return
        if len(set(keys)) != len(keys):
            raise ValueError(f"duplicate keys in {list(keys)!r}")
        block = np.asarray(vecs, dtype=np.float64)
        if block.shape != (len(keys), self.d):
            raise ValueError(
                f"load vectors for {list(keys)!r} have shape {block.shape}, expected ({len(keys)}, {self.d})"
            )
        check_loads(block, f"load vectors for {list(keys)!r}")
        for key in keys:
            self.remove(key)
        n, m = len(self._keys), len(keys)
        while n + m > self._vecs.shape[0]:
            self._grow()
        self._vecs[n : n + m] = block
        if self._terms is not None:
            self._terms[n : n + m] = self._terms_of(block)
        if self._gram is not None:
            dots = self._vecs[: n + m] @ block.T  # (n + m, m)
            self._gram[: n + m, n : n + m] = dots
            self._gram[n : n + m, : n + m] = dots.T
        for i, key in enumerate(keys):
            self._slot[key] = n + i
        self._keys.extend(keys)

    def remove(self, key: Hashable) -> None:
        """Forget ``key`` (no-op if absent) by moving the last vector into its slot."""
        i = self._slot.pop(key, None)
        if i is None:
            return
        last = len(self._keys) - 1
        if i != last:
            moved = self._keys[last]
            self._vecs[i] = self._vecs[last]
            if self._terms is not None:
                self._terms[i] = self._terms[last]
            if self._gram is not None:
                self._gram[i, :] = self._gram[last, :]
                self._gram[:, i] = self._gram[:, last]
                self._gram[i, i] = self._gram[last, last]
            self._keys[i] = moved
            self._slot[moved] = i
        self._keys.pop()

    def retain(self, keep: set) -> None:
        """Forget every key not in ``keep`` (requests that left the queue)."""
        for key in [k for k in self._keys if k not in keep]:
            self.remove(key)

    def window(self, keys: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray | None]:
        """The vectors of ``keys`` (in that order) and their Gram matrix (None: not kept), ready for select()."""
        idx = self._index(keys)
        return self._vecs[idx], None if self._gram is None else self._gram[idx][:, idx]

    def terms(self, keys: Sequence[Hashable]) -> np.ndarray | None:
        """The kept transform of the vectors of ``keys`` (None: the cache keeps none)."""
        return None if self._terms is None else self._terms[self._index(keys)]

    def _index(self, keys: Sequence[Hashable]) -> np.ndarray:
        return np.fromiter(map(self._slot.__getitem__, keys), dtype=np.intp, count=len(keys))

    def _grow(self) -> None:
        n = self._vecs.shape[0]
        vecs = np.zeros((2 * n, self.d))
        vecs[:n] = self._vecs
        self._vecs = vecs
        if self._gram is not None:
            gram = np.zeros((2 * n, 2 * n))
            gram[:n, :n] = self._gram
            self._gram = gram
        if self._terms is not None:
            terms = np.zeros((2 * n, self.d))
            terms[:n] = self._terms
            self._terms = terms
