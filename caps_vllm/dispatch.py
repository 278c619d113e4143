"""Expert-affinity dispatch: which replica (or data-parallel engine) should serve a request.

Each replica's decode step reads the weights of every expert its running requests route to.
A request whose experts a replica already reads adds only their arithmetic there; elsewhere it
adds weight reads too. So each replica's in-flight requests are kept as one expected
per-expert load (the sum of their per-token vectors: what they add to each decode step), and
a request goes to the replica whose step it makes least dearer, by the same step-cost model
``step_cost`` prices admissions with (:mod:`caps_vllm.step_cost`, expected counts):

    score(r) = cost(load_r + v) - cost(load_r) + balance_ms x in_flight(r)

That marginal cost falls as a replica fills (a busy replica already reads most experts), so it
herds requests onto one replica until the guard stops it: in the twin's dispatch study it loses to
least-loaded by up to 21 % TPOT at 8-16 requests per replica. ``objective="tpot"`` scores what a
request does to the requests' mean TPOT instead, each request's TPOT being its replica's step time:

    score(r) = (n_r + 1) x cost(load_r + v) - n_r x cost(load_r)      (n_r: in flight on r)

which prices the slower steps of everyone already there. Both run under a load guard: a replica
with more than ``margin`` requests in flight above the least loaded one is not a candidate
(vLLM's own DP front end balances on those counts alone). Ties go to the replica with fewer in
flight. Pure numpy, no vLLM: the twin's dispatch study and a front end use this class.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from caps_vllm.step_cost import StepCostModel


@dataclass(frozen=True, slots=True)
class Choice:
    replica: int
    score_ms: float  # the chosen replica's score
    overridden: bool  # the replica with the best affinity was over the load guard


class AffinityDispatcher:
    def __init__(
        self,
        replicas: int,
        d: int,
        cost: StepCostModel,
        margin: int = 8,
        balance_ms: float | None = None,
        objective: str = "step",
    ) -> None:
        """``d``: length of the load vectors (MoE layers x experts); ``balance_ms``: price of one
        request in flight (default: one expert's weight read with ``objective`` "step", so
        affinity decides until the guard does; 0 with "tpot", which prices load itself)."""
        if objective not in ("step", "tpot"):
            raise ValueError(f"objective {objective!r}; valid: step, tpot")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be a positive integer, got {replicas!r}")
        if isinstance(margin, bool) or not isinstance(margin, int) or margin < 0:
            raise ValueError(f"margin must be an integer >= 0, got {margin!r}")
        self.cost = cost
        self.margin = margin
        self.objective = objective
        default_balance = cost.weight_ms if objective == "step" else 0.0
        self.balance_ms = default_balance if balance_ms is None else float(balance_ms)
        self.load = np.zeros((replicas, d))
        self.in_flight = np.zeros(replicas, dtype=np.int64)
        self._where: dict[Hashable, tuple[int, np.ndarray | None]] = {}
        self.overrides = 0

    def _step_ms(self, loads: np.ndarray) -> np.ndarray:
        return self.cost.expert_ms(loads, expected=True).sum(axis=-1)

    def choose(self, vec: np.ndarray | None) -> Choice:
        """The replica for a request with per-token load ``vec`` (None: no prediction, the least
        loaded one)."""
        flight = self.in_flight
        eligible = flight <= flight.min() + self.margin
        if vec is None:
            delta = np.zeros(len(flight))
        elif self.objective == "tpot":
            delta = (flight + 1) * self._step_ms(self.load + vec) - flight * self._step_ms(self.load)
        else:
            delta = self._step_ms(self.load + vec) - self._step_ms(self.load)
        score = delta + self.balance_ms * flight
        best_any = int(np.lexsort((flight, score))[0])
        score_ok = np.where(eligible, score, np.inf)
        best = int(np.lexsort((flight, score_ok))[0])
        overridden = best != best_any and not eligible[best_any]
        self.overrides += overridden
        return Choice(best, float(score[best]), bool(overridden))

    def started(self, key: Hashable, replica: int, vec: np.ndarray | None) -> None:
        """``key`` was sent to ``replica`` (its load counts until :meth:`finished`)."""
        if key in self._where:
            raise ValueError(f"request {key!r} is already in flight")
        self._where[key] = (replica, vec)
        self.in_flight[replica] += 1
        if vec is not None:
            self.load[replica] += vec

    def finished(self, key: Hashable) -> None:
        """``key`` ended (finished, aborted or failed): its load leaves its replica."""
        got = self._where.pop(key, None)
        if got is None:
            return
        replica, vec = got
        self.in_flight[replica] -= 1
        if vec is not None:
            self.load[replica] -= vec
            np.maximum(self.load[replica], 0.0, out=self.load[replica])  # float drift

    def distinct_experts(self, layers: int) -> np.ndarray:
        """Expected distinct experts per layer of each replica's decode step (for metrics)."""
        touched = -np.expm1(-self.load)
        return touched.reshape(len(self.load), layers, -1).sum(axis=-1).mean(axis=-1)
