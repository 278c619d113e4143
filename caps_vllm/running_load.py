"""The running batch's predicted expert load, now and over the decode steps a newcomer shares.

A request admitted now joins the decode steps of the running requests that are still there:
one finishing in 3 steps shares 3 of a 128-token newcomer's steps, one with 500 left shares
all 128. So the load CAPS prices a candidate against is each running request's per-step vector
weighted by the share of the candidate's horizon it will still be running,
``min(remaining_i, horizon) / horizon``: the mean decode step of the candidate's life, not the
step it is admitted in. Remaining steps are ``max_tokens`` minus the tokens generated (an upper
bound: a request may stop early at EOS).

Rows live in one float32 matrix sized for vLLM's sequence slots (half the memory a product
reads; the twin's decisions came out the same as in float64). The scheduler keeps them in step
with the running batch by its changes (rows added as requests join, their vectors filled in
when a choice needs them, removed as they leave), or, where it has walked the running batch
anyway, hands over its ids (:meth:`sync`); the weighted sum is one matrix-vector product, on
the steps that make a choice (no plain sum is kept: each change is just its row). The steps
left need not be read off every running request either (with hundreds running, those reads
cost more than the product): each row keeps the step its request would end on, set when the
scheduler last read it (``now + remaining``), and a request in plain decode takes one token a
step, so ``end - now`` is its steps left; the scheduler reads a request again when it starts
plain decode (prefill steps make no output). Pure numpy, no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence

import numpy as np


class RunningLoad:
    """Per-request load vectors of the running batch, summed with weights when a choice needs it."""

    def __init__(self, d: int, slots: int = 16, dtype: type = np.float32) -> None:
        """``slots``: rows allocated up front (vLLM's max_num_seqs); more are added as needed.
        ``dtype``: the rows' (float32: half the memory the products read)."""
        self.d = d
        self._rows = np.zeros((max(int(slots), 1), d), dtype=dtype)
        self._end = np.zeros(self._rows.shape[0])  # the step each row's request ends on (see refresh)
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
            self._rows = np.vstack([self._rows, np.zeros((n, self.d), dtype=self._rows.dtype)])
            self._end = np.concatenate([self._end, np.zeros(n)])
            self._free = list(range(2 * n - 1, n - 1, -1))
        i = self._free.pop()
        self._row[key] = i
        self._end[i] = 0.0
        if vec is not None:
            self._rows[i] = vec

    def fill(self, key: Hashable, vec: np.ndarray | None) -> None:
        """Give ``key``'s row (added without a prediction, or with another) the load ``vec``."""
        self._rows[self._row[key]] = 0.0 if vec is None else vec

    def rows(self) -> np.ndarray:
        """The row numbers in use (in no particular order)."""
        return np.fromiter(self._row.values(), dtype=np.intp, count=len(self._row))

    def vector(self, key: Hashable) -> np.ndarray:
        """``key``'s row (zeros for a request added without a prediction)."""
        return self._rows[self._row[key]]

    def remove(self, key: Hashable) -> None:
        i = self._row.pop(key, None)
        if i is None:
            return
        self._rows[i] = 0.0
        self._free.append(i)

    def sync(
        self,
        keys: Sequence[Hashable],
        vector_of: Callable[[int], np.ndarray | None],
        remaining_of: Callable[[int], int] | None = None,
        now: int = 0,
    ) -> np.ndarray:
        """Make the rows exactly ``keys`` (the running requests; ``vector_of(i)`` is the load of
        ``keys[i]`` and ``remaining_of(i)`` its steps left at step ``now``, asked only for a
        newcomer) and return their row numbers, in that order."""
        rows = list(map(self._row.get, keys))
        if None in rows:
            for i, r in enumerate(rows):
                if r is None:
                    self.add(keys[i], vector_of(i))
                    rows[i] = self._row[keys[i]]
                    if remaining_of is not None:
                        self._end[rows[i]] = now + remaining_of(i)
        if len(self._row) > len(keys):  # every key is a row now: the rest have stopped running
            for key in self._row.keys() - set(keys):
                self.remove(key)
        return np.fromiter(rows, dtype=np.intp, count=len(rows))

    def refresh(self, key: Hashable, remaining: int, now: int) -> None:
        """``key`` has ``remaining`` steps left at step ``now`` (no-op for a key without a row)."""
        i = self._row.get(key)
        if i is not None:
            self._end[i] = now + remaining

    def steps_left(self, rows: np.ndarray, now: int) -> np.ndarray:
        """Each row's steps left at step ``now``, from when it was last read (see :meth:`refresh`):
        exact while the request took one token every step since, fewer if it missed steps."""
        return self._end[rows] - now

    def shared(self, rows: np.ndarray, remaining: Sequence[int], horizon: float) -> np.ndarray:
        """The mean load over the next ``horizon`` decode steps: row ``rows[i]`` weighted by
        ``min(remaining[i], horizon) / horizon`` (rows not named: weight 0)."""
        if not len(rows):
            return np.zeros(self.d)
        hi = int(rows.max()) + 1  # rows are handed out lowest first: the rest are empty
        w = np.zeros(hi, dtype=np.float32)
        if horizon <= 0:  # no horizon: the plain sum
            w[rows] = 1.0
        else:
            w[rows] = np.clip(np.asarray(remaining, dtype=np.float32), 0.0, horizon) / np.float32(horizon)
        return (w @ self._rows[:hi]).astype(np.float64)
