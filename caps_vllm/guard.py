"""The live guard: do CAPS's reorderings pay on the routing the model really produced?

``step_cost`` reorders only when its *prediction* says the new admissions make the decode step
cheaper than FCFS's (by the share ``min_gain``). The predictor can be wrong, so every reordering is
kept as a decision — the load it was priced against, CAPS's admissions, FCFS's — and scored
again once the workers have routed the prompts of all of them (FCFS's requests are routed
later, when they are admitted in turn): the realized gain is the same step-cost model applied to
their captured routing (per token, as the planner prices requests). Over the last ``window``
resolved decisions a realized loss in total trips the guard: admission falls back to FCFS
(logged, counted), while the planner keeps deciding in the shadow so the decisions go on being
scored; once the shadow decisions gain again, CAPS resumes.

What it cannot see: the running batch's own routing is the prediction it was priced with, and
a request whose prompt is never routed (aborted, a full prefix-cache hit) leaves its decisions
unresolved; they expire after ``max_pending`` newer ones. Pure numpy, no vLLM.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger("caps_vllm.guard")


@dataclass(frozen=True, slots=True)
class Decision:
    caps: tuple[Hashable, ...]  # admitted by CAPS's order
    fcfs: tuple[Hashable, ...]  # what FCFS would have admitted in their place
    base: np.ndarray  # the load both were priced against
    predicted_ms: float  # the gain the planner predicted


class FcfsGuard:
    def __init__(
        self, cost: Callable[[np.ndarray], np.ndarray], unit_mass: float, window: int = 64, max_pending: int = 512
    ) -> None:
        """``cost``: rows of loads -> step milliseconds (the strategy's); ``unit_mass``: the mass
        of a per-token vector (layers x top_k), to which captured counts are scaled."""
        self.cost, self.unit_mass, self.window = cost, unit_mass, window
        self.pending: deque[Decision] = deque()
        self.max_pending = max_pending
        self.recent: deque[float] = deque(maxlen=window)  # realized gains, ms
        self.tripped = False
        self.resolved = 0
        self.expired = 0
        self._wanted: Counter[Hashable] = Counter()  # keys of pending decisions
        self._counts: dict[Hashable, np.ndarray] = {}  # routed so far, prompts not finished
        self._truth: dict[Hashable, np.ndarray] = {}  # per-token routing of finished prompts

    def wants(self, key: Hashable) -> bool:
        return key in self._wanted

    def decided(
        self, caps: Sequence[Hashable], fcfs: Sequence[Hashable], base: np.ndarray, predicted_ms: float
    ) -> None:
        d = Decision(tuple(caps), tuple(fcfs), base.copy(), float(predicted_ms))
        self.pending.append(d)
        self._wanted.update(d.caps + d.fcfs)
        while len(self.pending) > self.max_pending:
            self.expired += 1
            self._forget(self.pending.popleft())

    def routed(self, key: Hashable, counts: np.ndarray, prompt_done: bool) -> list[float]:
        """Captured routing of part of ``key``'s prompt; returns the gains of the decisions this resolved."""
        if key not in self._wanted:
            return []
        acc = self._counts.get(key)
        acc = counts.astype(np.float64).ravel() if acc is None else acc + counts.ravel()
        if not prompt_done:
            self._counts[key] = acc
            return []
        self._counts.pop(key, None)
        mass = acc.sum()
        if mass <= 0:
            return []
        self._truth[key] = acc * (self.unit_mass / mass)
        return self._resolve()

    def _resolve(self) -> list[float]:
        gains, keep, truth = [], deque(), self._truth
        for d in self.pending:
            if all(k in truth for k in d.caps + d.fcfs):
                rows = np.stack([d.base + sum(truth[k] for k in d.fcfs), d.base + sum(truth[k] for k in d.caps)])
                ms = self.cost(rows)
                gains.append(float(ms[0] - ms[1]))
                self._forget(d)
            else:
                keep.append(d)
        self.pending = keep
        for g in gains:
            self.recent.append(g)
        self.resolved += len(gains)
        if gains:
            self._judge()
        return gains

    def _forget(self, d: Decision) -> None:
        self._wanted.subtract(d.caps + d.fcfs)
        for k in d.caps + d.fcfs:
            if self._wanted[k] <= 0:
                del self._wanted[k]
                self._truth.pop(k, None)
                self._counts.pop(k, None)

    def _judge(self) -> None:
        if len(self.recent) < min(self.window, 16):
            return
        total = sum(self.recent)
        if not self.tripped and total < 0:
            self.tripped = True
            self.recent.clear()  # the shadow decisions decide when to resume
            logger.warning(
                "CAPS guard: the last %d reorderings cost %.4g ms more than FCFS's admissions would have "
                "(captured routing x step-cost model); admission falls back to FCFS and CAPS keeps "
                "scoring its choices in the shadow",
                self.window,
                -total,
            )
        elif self.tripped and total > 0:
            self.tripped = False
            self.recent.clear()
            logger.warning(
                "CAPS guard: the last %d shadow choices would have gained %.4g ms over FCFS; CAPS reorders again",
                self.window,
                total,
            )
