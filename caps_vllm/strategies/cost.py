"""``step_cost``: admit the requests that add the least predicted MoE step time per token.

The load vectors are expected per-expert token counts of one step (per-token routing, summed
over the running requests). The cost is :mod:`caps_vllm.step_cost`'s fitted model: on one
device (``ranks=1``) the sum of per-expert costs, so a candidate is cheap when its experts are
already being read (affinity); under expert parallelism the slowest rank of each layer, so a
candidate is cheap when it loads the ranks that wait anyway (balance). When every expert is
past the break-even load (compute bound) all candidates cost the same per token and the order
stays FCFS. Greedy: oldest first, then repeatedly the smallest cost increase per token.
"""

from __future__ import annotations

import functools

import numpy as np

from caps_vllm.step_cost import StepCostModel, check_placement, expert_placement
from caps_vllm.strategies.base import Strategy, Window


class StepCost(Strategy):
    name = "step_cost"
    uses_stats = False
    uses_dots = False  # it prices the load itself
    #: settings the live scheduler reads from vLLM (the user's strategy_params win)
    deployment_params = ("experts", "ranks", "placement")

    def __init__(
        self,
        seed: int = 0,
        ranks: int = 1,
        placement: str | list[int] = "linear",
        experts: int | None = None,
        cost: dict | None = None,
        shape: str | None = None,
    ) -> None:
        """``ranks``: expert-parallel ranks (1: one device); ``placement``: vLLM's placement
        name or an explicit expert -> rank list; ``experts``: experts per MoE layer (splits
        the vectors into layers; needed with ranks > 1); ``cost``: coefficients overriding
        the shipped fit ({fixed_ms, weight_ms, token_ms, form}); ``shape``: another shipped
        fit by name."""
        super().__init__(seed)
        self.model = StepCostModel(**cost) if cost is not None else StepCostModel.load(shape=shape)
        self.placement: np.ndarray | None = None
        if isinstance(placement, (list, tuple, np.ndarray)):
            self.placement = check_placement(list(placement), experts)
            experts = self.placement.shape[0]
        elif ranks != 1:
            if experts is None:
                raise ValueError("step_cost with ranks > 1 needs experts (experts per MoE layer) or a placement list")
            self.placement = expert_placement(experts, ranks, placement)
        else:
            expert_placement(experts or 1, 1, placement)  # validates the name
        self.experts = experts
        #: one device, linear form: the increase is separable into weight reads and arithmetic
        self._linear = self.placement is None and self.model.form == "linear"
        if self._linear:
            self.row_terms = _touched

    def cost(self, loads: np.ndarray) -> np.ndarray:
        """Predicted step milliseconds of each load row (fixed part left out: same for all)."""
        if self.placement is None:
            return self.model.expert_ms(loads, expected=True).sum(axis=-1)
        layers = loads.reshape(loads.shape[0], -1, self.placement.shape[0])
        return (self.model.layer_ms(layers, self.placement, expected=True) - self.model.fixed_ms).sum(axis=-1)

    def least_increase(self, masses: np.ndarray) -> float:
        """A lower bound on what candidates of these masses (tokens x top-k) add to :meth:`cost`
        whatever their experts: their arithmetic under the linear form on one device (reading
        weights only adds to it), nothing otherwise (a roofline expert may absorb tokens free)."""
        if self._linear:
            return self.model.token_ms * float(np.sum(masses))
        return 0.0

    def _pick(self, vecs: np.ndarray, window: Window | None, b: int) -> list[int]:
        assert window is not None
        if self.placement is not None and vecs.shape[1] % self.placement.shape[0]:
            raise ValueError(
                f"load vectors of length {vecs.shape[1]} do not split into layers of {self.placement.shape[0]} experts"
            )
        load = window.running + vecs[0]
        mass = vecs @ _ones(vecs.shape[1])  # (BLAS: half the time of a row sum here)
        inv = np.where(mass > 0, 1.0 / np.maximum(mass, 1e-12), 0.0)  # per token; a massless candidate scores 0
        blocked = np.zeros(vecs.shape[0])  # +inf once picked
        blocked[0] = np.inf
        if self._linear:
            return self._pick_linear(vecs, window, b, load, mass, inv, blocked)
        delta = self._increase(load, vecs)  # cost increase of adding each candidate
        picks = []
        for _ in range(b - 1):
            j = _cheapest(delta * inv + blocked)
            picks.append(j)
            blocked[j] = np.inf
            if self.placement is None:
                # One device: the cost is a sum over experts, so only the picked request's
                # experts change anybody's increase.
                cols = np.flatnonzero(vecs[j])
                before = self._increase(load[cols], vecs[:, cols])
                load[cols] += vecs[j, cols]
                delta += self._increase(load[cols], vecs[:, cols]) - before
            else:
                load = load + vecs[j]
                delta = self._increase(load, vecs)
        return picks

    def _pick_linear(self, vecs, window: Window, b: int, load, mass, inv, blocked) -> list[int]:
        """One device, linear form: the increase is weight x (expected new experts touched) +
        token x mass, and the expected new experts are touched(v) . exp(-load): one
        matrix-vector product, and one more after each pick to take the picked request's
        expected experts off everybody's score (dense over the experts: a handful of array
        operations a pick, as few as the dot-product greedy's)."""
        touched = window.terms if window.terms is not None else _touched(vecs)
        untouched = np.exp(-load)
        per_new = self.model.weight_ms * inv
        score = per_new * (touched @ untouched)
        score += self.model.token_ms * (mass > 0)  # token x mass per token
        score += blocked
        picks = []
        gone, fewer = np.empty_like(untouched), np.empty_like(score)  # (written in place each pick)
        for n in range(b - 1):
            j = _cheapest(score)
            picks.append(j)
            if n == b - 2:
                break  # the last pick: nobody's score is read again
            np.multiply(untouched, touched[j], out=gone)  # exp(-load) - exp(-load - v_j)
            np.dot(touched, gone, out=fewer)
            fewer *= per_new
            score -= fewer
            score[j] = np.inf
            untouched -= gone
        return picks

    def _increase(self, load: np.ndarray, vecs: np.ndarray) -> np.ndarray:
        return self.cost(load[None, :] + vecs) - self.cost(load[None, :])[0]


def _cheapest(per_token: np.ndarray) -> int:
    """The smallest score; equal within rounding counts as a tie, and a tie goes to the oldest."""
    # (argmin and a read: a quarter of min()'s time on a short array; the methods, not np.argmax)
    best = float(per_token[per_token.argmin()])
    return int((per_token <= best + 1e-9 * max(abs(best), 1e-12)).argmax())


@functools.lru_cache(maxsize=4)
def _ones(d: int) -> np.ndarray:
    """A read-only vector of ones (summing rows through BLAS without allocating one a call)."""
    ones = np.ones(d)
    ones.flags.writeable = False
    return ones


def _touched(vecs: np.ndarray) -> np.ndarray:
    """Probability that each expert is touched by each row's expected counts (Poisson)."""
    return -np.expm1(-vecs)
