"""The one contract every batch-selection strategy keeps.

A strategy sees the expert load already running (one vector of length d), a window of W
candidate load vectors ordered oldest first, and B free slots. It returns the window
indices to admit: min(B, W) of them (no slot stays empty while candidates wait), no
duplicates, the oldest candidate (index 0) always first so that no request can be starved
by the policy. The live scheduler and the offline
simulator both call :meth:`Strategy.select`, so a comparison in the simulator is a
comparison of the code that serves.

Vectors are float64 on purpose: expert counts are integers, float64 keeps every score
exact for realistic counts, so ties (and therefore the equivalences between strategies)
are decided the same way on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def as_load_matrix(candidates: np.ndarray | list, d: int | None = None) -> np.ndarray:
    """Return candidates as a (W, d) float64 array; an empty window may come as any empty shape."""
    arr = np.asarray(candidates, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, d if d is not None else (arr.shape[-1] if arr.ndim == 2 else 0))
    if arr.ndim != 2:
        raise ValueError(f"candidates must be a (W, d) matrix, got shape {arr.shape}")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"candidate vectors have length {arr.shape[1]}, running load has {d}")
    return arr


def check_loads(arr: np.ndarray, what: str) -> None:
    """Raise ValueError unless every entry is finite and non-negative (a load is a count)."""
    if arr.size and not (np.isfinite(arr).all() and arr.min() >= 0.0):
        bad = "NaN" if np.isnan(arr).any() else ("infinite" if np.isinf(arr).any() else "negative")
        raise ValueError(f"{what} contains {bad} values; expert loads must be finite and >= 0")


@dataclass
class Window:
    """Per-call view of the candidates with the quantities the scorers share.

    ``dots`` holds each candidate's dot product with the current load and is updated in
    place as picks are made; a picked candidate's entry becomes +inf so it can never be
    picked again (inf plus a finite column stays inf). The other statistics are only
    computed for strategies that ask for them (``stats=True``): each is a pass over W*d.
    """

    vecs: np.ndarray  # (W, d)
    dots: np.ndarray | None  # (W,) v_i . L, updated per pick (None: the strategy does not score by it)
    gram: np.ndarray | None  # (W, W) v_i . v_j, if the caller keeps one
    norms: np.ndarray | None = None  # (W,) ||v_i||^2
    mass: np.ndarray | None = None  # (W,) sum of v_i
    load_mass: float = 0.0  # sum of L
    load_sq: float = 0.0  # ||L||^2
    running: np.ndarray | None = None  # the load before any pick
    terms: np.ndarray | None = None  # (W, d) the strategy's row_terms of the candidates, if the caller keeps them

    @classmethod
    def build(
        cls, running: np.ndarray, vecs: np.ndarray, gram: np.ndarray | None, stats: bool, dots: bool = True
    ) -> Window:
        w = cls(vecs=vecs, dots=vecs @ running if dots else None, gram=gram, running=running)
        if stats:
            w.norms = gram.diagonal().copy() if gram is not None else np.einsum("ij,ij->i", vecs, vecs)
            w.mass = vecs @ np.ones(vecs.shape[1])
            w.load_mass = float(running.sum())
            w.load_sq = float(running @ running)
        return w

    @property
    def d(self) -> int:
        return self.vecs.shape[1]

    def take(self, j: int) -> None:
        """Add candidate j to the load: O(W) with a Gram matrix, O(W*d) without."""
        if self.norms is not None and self.mass is not None:
            self.load_sq += 2.0 * self.dots[j] + self.norms[j]
            self.load_mass += self.mass[j]
        self.dots += self.gram[j] if self.gram is not None else self.vecs @ self.vecs[j]
        self.dots[j] = np.inf


class Strategy:
    """Base class: validates input once, handles the trivial cases, keeps the oldest first.

    Subclasses implement :meth:`_pick`, which receives a non-empty window and 1 <= B <= W
    and returns the b - 1 picks after index 0 (the base class prepends 0).
    """

    name: str = ""
    #: whether _pick wants the shared Window (dot products); ordering strategies don't
    uses_window: bool = True
    #: whether the scores need norms, masses and load statistics besides the dot products
    uses_stats: bool = True
    #: whether the scores start from the candidates' dot products with the load (Window.dots)
    uses_dots: bool = True
    #: parameters the live scheduler fills in from the deployment (see make_strategy)
    deployment_params: tuple[str, ...] = ()
    #: a row-wise transform of the candidates' vectors the scores start from, which a caller
    #: may keep per request and pass as ``terms`` (None: the strategy needs none)
    row_terms = None

    @property
    def uses_gram(self) -> bool:
        """Whether the window's pairwise dot products save this strategy work (a caller that keeps
        them, PairwiseCache, need not for one that does not)."""
        return self.uses_window and (self.uses_dots or self.uses_stats)

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def select(
        self,
        running: np.ndarray | list,
        candidates: np.ndarray | list,
        slots: int,
        *,
        gram: np.ndarray | None = None,
        checked: bool = False,
        terms: np.ndarray | None = None,
    ) -> list[int]:
        """Indices of the candidates to admit, oldest (0) first, at most ``slots`` of them.

        The order of the result is the strategy's preference order: when W <= B every
        candidate is returned, ranked, because the engine may still stop admitting early on
        a token or KV-cache budget.

        ``gram`` (W x W pairwise dot products of the candidates) makes each greedy pick O(W);
        the live scheduler maintains it incrementally (see :class:`PairwiseCache`).
        ``checked=True`` skips validation for callers that validated each vector already.
        ``terms``: ``row_terms(candidates)``, kept per request by the caller (PairwiseCache).
        """
        running = np.asarray(running, dtype=np.float64)
        if running.ndim != 1:
            raise ValueError(f"running load must be a vector, got shape {running.shape}")
        vecs = as_load_matrix(candidates, running.shape[0])
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 0:
            raise ValueError(f"slots must be a non-negative integer, got {slots!r}")
        if not checked:
            check_loads(running, "running load")
            check_loads(vecs, "candidate load vectors")
        w = vecs.shape[0]
        b = min(int(slots), w)
        if b == 0:
            return []
        if gram is not None and gram.shape != (w, w):
            raise ValueError(f"gram must be ({w}, {w}), got {gram.shape}")
        if terms is not None and terms.shape != vecs.shape:
            raise ValueError(f"terms must be {vecs.shape}, got {terms.shape}")
        window = Window.build(running, vecs, gram, self.uses_stats, self.uses_dots) if self.uses_window else None
        if window is not None:
            window.terms = terms
        rest = self._pick(vecs, window, b)
        return [0, *(int(i) for i in rest)]

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        raise NotImplementedError
