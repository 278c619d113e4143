"""Compiled loops for the per-token work that numpy cannot do in one pass.

A request's predicted load is a histogram over its prompt tokens' (layer, expert) bins. numpy
does it as a gather (a copy of every token's row) and a ``bincount`` (which first converts
the copy to 64-bit indices): three passes over tokens x layers x top-k entries. The loop here
reads each token's row of the table once and counts in place, skips ids outside the table in
the same pass, and takes a whole step's newcomers in one call. It is compiled by numba, which
every vLLM installation already carries (vLLM requires it), ahead of time for the table's two
index types, so nothing compiles on the engine's busy loop; the machine code is cached beside
this file (or in numba's user cache where this folder is read-only).
"""

from __future__ import annotations

import numba
import numpy as np

_SIGNATURES = [
    f"void({bins}[:, ::1], int64[::1], int64[::1], float64[:, ::1], int64[::1], boolean)" for bins in ("int16", "int32")
]


def _compiled(fn):
    try:
        return numba.njit(_SIGNATURES, cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location: compile for this process only
        return numba.njit(_SIGNATURES, nogil=True)(fn)


@_compiled
def count_rows(
    bins: np.ndarray, ids: np.ndarray, starts: np.ndarray, out: np.ndarray, skipped: np.ndarray, per_token: bool
) -> None:
    """For each prompt ``p`` (its ids are ``ids[starts[p]:starts[p + 1]]``) add 1 to ``out[p, b]``
    for every bin ``b`` in the rows ``bins[ids]``; ids outside the table are skipped and counted
    in ``skipped[p]``; with ``per_token`` each row is then divided by its prompt's ids counted.
    Several prompts in one call: one dispatch for a step's newcomers."""
    vocab, width = bins.shape
    for p in range(out.shape[0]):
        row = out[p]
        for t in range(starts[p], starts[p + 1]):
            i = ids[t]
            if i < 0 or i >= vocab:
                skipped[p] += 1
                continue
            for j in range(width):
                row[bins[i, j]] += 1.0
        known = starts[p + 1] - starts[p] - skipped[p]
        if per_token and known > 0:
            for b in range(row.shape[0]):
                row[b] /= known
