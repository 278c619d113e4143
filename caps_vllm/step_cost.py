"""Step cost of an MoE layer from its per-expert token counts, fitted to measured kernel times.

One device runs a layer's experts one after the other, and each expert it touches costs at
least the time to read its weights; with many tokens it costs their arithmetic instead. So a
layer takes ``fixed + sum over experts of max(weight, token * n_e)`` (form "roofline"), or
with the two costs simply added, ``fixed + weight * distinct + token * assignments`` (form
"linear"). Under expert parallelism every rank runs its own experts and the layer waits for
the slowest rank: ``fixed + max over ranks of its experts' sum``.

The coefficients come from ``caps-vllm fit-step-cost`` (:mod:`caps_vllm.profiling.fit_step_cost`) over measured times of vLLM's
fused-MoE op; the fit for the serving hardware ships in ``caps_vllm/data/step_cost.json``.
Loads may be *expected* counts (a running batch's predicted routing, fractional): an expert
with expected count ``m`` is then touched with probability ``1 - exp(-m)`` (Poisson routing),
which is also what makes the cost smooth enough to rank candidates by.

Pure numpy, no vLLM: the simulator's execution models and the ``step_cost`` strategy both
call this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

FORMS = ("roofline", "linear")
PLACEMENTS = ("linear", "round_robin")
DEFAULT_FIT = Path(__file__).parent / "data" / "step_cost.json"


@dataclass(frozen=True)
class StepCostModel:
    """Milliseconds of one MoE layer as a function of its per-expert token counts."""

    fixed_ms: float
    weight_ms: float  # per distinct expert: reading its weights
    token_ms: float  # per (token, expert) assignment: the arithmetic
    form: str = "roofline"

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"step cost form {self.form!r}; valid: {', '.join(FORMS)}")
        for name in ("fixed_ms", "weight_ms", "token_ms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"step cost {name}: {v!r}; valid: a finite number >= 0")

    @classmethod
    def load(cls, path: str | Path = DEFAULT_FIT, shape: str | None = None) -> StepCostModel:
        """The fit stored by ``caps-vllm fit-step-cost`` (its ``default`` shape unless ``shape`` is named)."""
        doc = _read_fits(str(path))
        name = shape or doc["default"]
        if name not in doc["fits"]:
            raise ValueError(f"{path}: no step-cost fit for shape {name!r}; have {', '.join(doc['fits'])}")
        fit = doc["fits"][name]
        return cls(fit["fixed_ms"], fit["weight_ms"], fit["token_ms"], fit["form"])

    def as_dict(self) -> dict:
        return asdict(self)

    def expert_ms(self, counts: np.ndarray, expected: bool = False) -> np.ndarray:
        """Per-expert milliseconds (same shape as ``counts``), without the fixed part.

        ``expected``: counts are expected values; an expert is touched with probability
        1 - exp(-count) instead of whenever its count is positive.
        """
        counts = np.asarray(counts, dtype=np.float64)
        touched = -np.expm1(-counts) if expected else (counts > 0).astype(np.float64)
        read, compute = self.weight_ms * touched, self.token_ms * counts
        return np.maximum(read, compute) if self.form == "roofline" else read + compute

    def layer_ms(self, counts: np.ndarray, placement: np.ndarray | None = None, expected: bool = False) -> np.ndarray:
        """Milliseconds of each layer: ``counts`` is (..., experts); the result drops that axis.

        With a ``placement`` (expert -> rank), the layer waits for its slowest rank.
        """
        per_expert = self.expert_ms(counts, expected)
        if placement is None:
            return self.fixed_ms + per_expert.sum(axis=-1)
        return self.fixed_ms + rank_sums(per_expert, placement).max(axis=-1)


@lru_cache(maxsize=8)
def _read_fits(path: str) -> dict:
    """The fits file, read once per process (every step_cost strategy and model loads it)."""
    return json.loads(Path(path).read_text())


def rank_sums(per_expert: np.ndarray, placement: np.ndarray) -> np.ndarray:
    """Sum (..., experts) over the experts of each rank: (..., ranks)."""
    placement = np.asarray(placement)
    one_hot = np.zeros((placement.shape[0], int(placement.max()) + 1))
    one_hot[np.arange(placement.shape[0]), placement] = 1.0
    return per_expert @ one_hot


def expert_placement(experts: int, ranks: int, strategy: str = "linear") -> np.ndarray:
    """Expert -> rank map as vLLM builds it (``determine_expert_map``): experts spread evenly,
    the first ``experts % ranks`` ranks take one more; "linear" puts contiguous blocks on a
    rank, "round_robin" deals them out in turn."""
    if isinstance(experts, bool) or not isinstance(experts, (int, np.integer)) or experts < 1:
        raise ValueError(f"experts must be a positive integer, got {experts!r}")
    if isinstance(ranks, bool) or not isinstance(ranks, (int, np.integer)) or not 1 <= ranks <= experts:
        raise ValueError(f"expert-parallel ranks must be an integer in [1, {experts}], got {ranks!r}")
    if strategy == "round_robin":
        return np.arange(experts) % ranks
    if strategy != "linear":
        raise ValueError(f"expert placement {strategy!r}; valid: {', '.join(PLACEMENTS)} or a list of ranks")
    base, extra = divmod(experts, ranks)
    sizes = [base + 1 if r < extra else base for r in range(ranks)]
    return np.repeat(np.arange(ranks), sizes)


def check_placement(placement: list | np.ndarray, experts: int | None = None) -> np.ndarray:
    """An explicit expert -> rank list, checked: integers >= 0, every rank in 0..max used."""
    arr = np.asarray(placement)
    if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
        raise ValueError("placement must be a non-empty list of non-negative integer ranks, one per expert")
    if experts is not None and arr.shape[0] != experts:
        raise ValueError(f"placement lists {arr.shape[0]} experts, the model has {experts}")
    missing = sorted(set(range(int(arr.max()) + 1)) - set(arr.tolist()))
    if missing:
        raise ValueError(f"placement leaves rank(s) {missing} without experts")
    return arr
