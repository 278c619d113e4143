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

import functools

import numba
import numpy as np

_BINS = ("int16", "int32")


def _compiled(fn, signatures=None):
    jit = functools.partial(numba.njit, signatures) if signatures else numba.njit
    try:
        return jit(cache=True, nogil=True)(fn)
    except RuntimeError:  # no writable cache location: compile for this process only
        return jit(nogil=True)(fn)


@_compiled
def _count_prompt(bins, ids, lo, hi, row, per_token):
    """Add 1 to ``row[b]`` for every bin ``b`` in the rows ``bins[ids[lo:hi]]`` (then divide by
    the ids counted, with ``per_token``); returns the ids outside the table, skipped."""
    vocab, width = bins.shape
    skipped = 0
    for t in range(lo, hi):
        i = ids[t]
        if i < 0 or i >= vocab:
            skipped += 1
            continue
        for j in range(width):
            row[bins[i, j]] += 1.0
    known = hi - lo - skipped
    if per_token and known > 0:
        for b in range(row.shape[0]):
            row[b] /= known
    return skipped


def _rows(fn):
    return _compiled(
        fn, [f"void({b}[:, ::1], int64[::1], int64[::1], float64[:, ::1], int64[::1], boolean)" for b in _BINS]
    )


def _one(fn):
    return _compiled(fn, [f"int64({b}[:, ::1], int64[::1], float64[::1], boolean)" for b in _BINS])


@_rows
def count_rows(
    bins: np.ndarray, ids: np.ndarray, starts: np.ndarray, out: np.ndarray, skipped: np.ndarray, per_token: bool
) -> None:
    """For each prompt ``p`` (its ids are ``ids[starts[p]:starts[p + 1]]``) add 1 to ``out[p, b]``
    for every bin ``b`` in the rows ``bins[ids]``; ids outside the table are skipped and counted
    in ``skipped[p]``; with ``per_token`` each row is then divided by its prompt's ids counted.
    Several prompts in one call: one dispatch for a step's newcomers."""
    for p in range(out.shape[0]):
        skipped[p] += _count_prompt(bins, ids, starts[p], starts[p + 1], out[p], per_token)


@_one
def count_one(bins: np.ndarray, ids: np.ndarray, out: np.ndarray, per_token: bool) -> int:
    """:func:`count_rows` for one prompt into the vector ``out``; returns the ids skipped (the
    fewer arrays a call builds and checks, the less a short prompt pays beside its count)."""
    return _count_prompt(bins, ids, 0, ids.shape[0], out, per_token)
