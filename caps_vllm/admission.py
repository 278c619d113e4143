"""Admission order: which waiting requests go to the front of vLLM's queue, and in what order.

This is the whole of CAPS's policy, kept out of vLLM's budget loop (as vLLM keeps policy in
its request queue): given the waiting requests in queue order, it returns a new order, and
vLLM's own ``schedule()`` then admits from the front while its budgets (tokens, KV blocks,
sequences, LoRA, ...) allow. The rules, in order:

1. preempted requests stay first (vLLM put them there);
2. requests waiting longer than ``max_wait_ms`` next, oldest first (bounded wait);
3. the strategy ranks a window of the next ``window_size`` requests against the load already
   running plus rules 1-2; its first pick is always the oldest of them (anti-starvation);
   a request without a predicted vector keeps its FCFS position inside the window;
4. everything else keeps its order.
Below ``min_batch_trigger`` waiting requests, with no free slot, or when every waiting request
fits in the free slots (no admission decision to make), the order is not touched.
Under the priority policy only the leading requests of the best priority are reordered, so a
lower priority never overtakes a higher one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from caps_vllm.config import CapsConfig
from caps_vllm.strategies import PairwiseCache, make_strategy

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Waiting(Generic[T]):
    """What the planner reads of one waiting request."""

    item: T
    key: Hashable
    arrival: float  # seconds, same clock as ``now``
    preempted: bool = False
    priority: int = 0


@dataclass
class AdmissionStats:
    """Cumulative counters (exported as metrics by the scheduler)."""

    plans: int = 0  # steps where the strategy ranked a window
    fcfs_fallback: int = 0  # steps left in FCFS order because fewer than min_batch_trigger waited
    ranked: int = 0  # requests ranked by the strategy into the admission slots
    bypassed: int = 0  # requests admitted ahead of the strategy by the max-wait rule (once each)
    no_vector: int = 0  # window requests kept in FCFS position for lack of a prediction
    last_selection_s: float = 0.0  # wall time of the last plan that ranked a window


class AdmissionPlanner:
    def __init__(self, cfg: CapsConfig, d: int, deployment: dict | None = None) -> None:
        """``deployment``: what the strategy may know of the serving setup (see make_strategy)."""
        self.cfg = cfg
        self.d = d
        try:
            self.strategy = make_strategy(cfg.strategy, seed=cfg.seed, deployment=deployment, **cfg.strategy_params)
        except ValueError as exc:
            raise ValueError(f"caps.strategy_params: {exc}") from None
        self.pairs = PairwiseCache(d, capacity=max(64, 2 * cfg.window_size))
        self.stats = AdmissionStats()
        self._bypassed: set[Hashable] = set()  # each request is counted once by the max-wait rule

    def engaged(self, queue_len: int, free_slots: int) -> bool:
        """Whether there is an admission decision to make (counts the FCFS-fallback steps)."""
        if queue_len == 0 or free_slots <= 0:
            return False
        if queue_len < self.cfg.min_batch_trigger:
            self.stats.fcfs_fallback += 1
            return False
        return queue_len > free_slots  # else everybody gets a slot

    def plan(
        self,
        waiting: Sequence[Waiting[T]],
        vector_of: Callable[[T], np.ndarray | None],
        running_load: np.ndarray,
        free_slots: int,
        now: float,
        by_priority: bool = False,
        queue_len: int | None = None,
    ) -> list[T] | None:
        """The new order of ``waiting``, or None to keep the current one.

        ``waiting`` may be just the head of a longer queue (``queue_len`` requests): the
        window_size + free_slots oldest are all the rules can move, since the tail is in
        arrival order and younger than the window.
        """
        n = len(waiting) if queue_len is None else queue_len
        if not self.engaged(n, free_slots):
            return None
        started = time.perf_counter()
        g = n
        if by_priority:
            g = next((i for i, w in enumerate(waiting) if w.priority != waiting[0].priority), n)
        group = waiting[:g]
        alive = {w.key for w in group}
        front: list[Waiting[T]] = []  # preempted
        overdue: list[Waiting[T]] = []
        pool: list[Waiting[T]] = []
        oldest_ok = -math.inf if self.cfg.max_wait_ms is None else now - self.cfg.max_wait_ms / 1000.0
        for w in group:
            (front if w.preempted else overdue if w.arrival < oldest_ok else pool).append(w)
        self._bypassed &= alive
        for w in overdue:
            if w.key not in self._bypassed:
                self._bypassed.add(w.key)
                self.stats.bypassed += 1
        slots = free_slots - len(front) - len(overdue)
        window, beyond = pool[: self.cfg.window_size], pool[self.cfg.window_size :]
        if slots <= 1 or len(window) <= 1:
            # Nothing for the strategy to choose; the max-wait rule may still reorder.
            new = front + overdue + pool
            if not overdue or all(a is b for a, b in zip(new, waiting)):
                return None
            return [w.item for w in new] + [w.item for w in waiting[g:]]

        load = running_load.copy()
        for w in front + overdue:
            v = vector_of(w.item)
            if v is not None:
                load += v
        vecs = [vector_of(w.item) for w in window]
        scored = [i for i, v in enumerate(vecs) if v is not None]
        ranked: list[int] = []
        if scored:
            missing = [i for i in scored if window[i].key not in self.pairs]
            self.pairs.add_many([window[i].key for i in missing], [vecs[i] for i in missing])
            cand, gram = self.pairs.window([window[i].key for i in scored])
            picks = self.strategy.select(load, cand, slots, gram=gram, checked=True)
            picked = set(picks)
            ranked = [scored[p] for p in picks] + [scored[p] for p in range(len(scored)) if p not in picked]
        # Requests without a vector keep their FCFS place; the ranked ones fill the others.
        it = iter(ranked)
        order = [i if vecs[i] is None else next(it) for i in range(len(window))]
        self.pairs.retain(alive)
        st = self.stats
        st.plans += 1
        st.ranked += min(slots, len(scored))
        st.no_vector += len(window) - len(scored)
        st.last_selection_s = time.perf_counter() - started
        new = front + overdue + [window[i] for i in order] + beyond
        return [w.item for w in new] + [w.item for w in waiting[g:]]
