"""The running batch's predicted expert load, now and over the decode steps a newcomer shares.

A request admitted now joins the decode steps of the running requests that are still there:
one finishing in 3 steps shares 3 of a 128-token newcomer's steps, one with 500 left shares
all 128. So the load CAPS prices a candidate against is each running request's per-step vector
weighted by the share of the candidate's horizon it will still be running,
``min(remaining_i, horizon) / horizon``: the mean decode step of the candidate's life, not the
step it is admitted in. Remaining steps are ``max_tokens`` minus the tokens generated (an upper
bound: a request may stop early at EOS).

Rows live in one float32 matrix sized for vLLM's sequence slots (half the memory a product
reads; the twin's decisions came out the same as in float64), and the scheduler hands over
the running requests' ids and steps left: bringing the rows up to date is a dict lookup per
request, the weighted sum one matrix-vector product, on the steps that make a choice. Pure
numpy, no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np


class RunningLoad:
    """Per-request load vectors of the running batch, with their sum kept up to date."""

    def __init__(self, d: int, slots: int = 16) -> None:
        """``slots``: rows allocated up front (vLLM's max_num_seqs); more are added as needed."""
        self.d = d
        self.total = np.zeros(d)
        self._rows = np.zeros((max(int(slots), 1), d), dtype=np.float32)
        self._row: dict[Hashable, int] = {}
        self._free: list[int] = list(range(self._rows.shape[0] - 1, -1, -1))

    def __contains__(self, key: Hashable) -> bool:
        return key in self._row

    def __len__(self) -> int:
        return len(self._row)

    def keys(self) -> Iterable[Hashable]:
        return self._row.keys()

    def add(self, key: Hashable, vec: np.ndarray | None) -> None:
        """A request starts running (None: no prediction, counted as no load)."""
        if key in self._row:
            return
        if not self._free:
            n = self._rows.shape[0]
            self._rows = np.vstack([self._rows, np.zeros((n, self.d), dtype=np.float32)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        i = self._free.pop()
        self._row[key] = i
        if vec is not None:
            self._rows[i] = vec
            self.total += vec

    def remove(self, key: Hashable) -> None:
        i = self._row.pop(key, None)
        if i is None:
            return
        self.total -= self._rows[i]
        self._rows[i] = 0.0
        self._free.append(i)
        np.maximum(self.total, 0.0, out=self.total)  # float drift

    def sync(self, keys: Sequence[Hashable], vector_of: Callable[[int], np.ndarray | None]) -> np.ndarray:
        """Make the rows exactly ``keys`` (the running requests; ``vector_of(i)`` is the load of
        ``keys[i]``, asked only for a newcomer) and return their row numbers, in that order."""
        rows = list(map(self._row.get, keys))
        if None in rows:
            for i, r in enumerate(rows):
                if r is None:
                    self.add(keys[i], vector_of(i))
                    rows[i] = self._row[keys[i]]
        if len(self._row) > len(keys):  # every key is a row now: the rest have stopped running
            for key in self._row.keys() - set(keys):
                self.remove(key)
        return np.fromiter(rows, dtype=np.intp, count=len(rows))

    def shared(self, rows: np.ndarray, remaining: Sequence[int], horizon: float) -> np.ndarray:
        """The mean load over the next ``horizon`` decode steps: row ``rows[i]`` weighted by
        ``min(remaining[i], horizon) / horizon`` (rows not named: weight 0)."""
        if horizon <= 0:
            return self.total.copy()
        if not len(rows):
            return np.zeros(self.d)
        hi = int(rows.max()) + 1  # rows are handed out lowest first: the rest are empty
        w = np.zeros(hi, dtype=np.float32)
        w[rows] = np.clip(np.asarray(remaining, dtype=np.float32), 0.0, horizon) / np.float32(horizon)
        return (w @ self._rows[:hi]).astype(np.float64)
