"""Admission order: which waiting requests go to the front of vLLM's queue, and in what order.

This is the whole of CAPS's policy, kept out of vLLM's budget loop (as vLLM keeps policy in
its request queue): given the waiting requests in queue order and the capacity vLLM has left
this step, it returns a new order, and vLLM's own ``schedule()`` then admits from the front
while its budgets (tokens, KV blocks, sequences, LoRA, ...) allow.

There is a decision only when vLLM will admit some but not all of the waiting requests: the
planner estimates how many it would admit in FCFS order (:func:`fcfs_admissions`: free sequence
slots, the token budget left after the running requests' tokens, chunked prefill, free KV
blocks), so a queue held back by the token budget or the KV cache engages CAPS as well as one
held back by sequence slots. The rules, in order:

1. preempted requests stay first (vLLM put them there);
2. requests waiting longer than ``max_wait_ms`` next, oldest first (a hard bound, off by
   default: under overload every request would pass it and the order would be FCFS);
3. requests passed over ``max_passes`` times next, oldest first: a request is *passed over* in
   a step where a younger request is admitted and it is not, so no request is ever overtaken
   in more than ``max_passes`` steps (the starvation bound, which holds under any load);
4. the strategy picks, from the ``k`` requests FCFS would admit plus the next ``window_size``,
   the ``k`` to admit (no request is pinned first, so one free place is still a choice);
   a request without a predicted vector keeps its FCFS position among them. A strategy that
   prices steps (``step_cost``) keeps FCFS's ``k`` unless its own pick is predicted to make the
   decode steps they share cheaper by more than the share ``min_gain``: never worse than FCFS by
   its model; and an order is taken only if vLLM would admit as many requests from it as from
   FCFS's, filling at least as much of the token budget: CAPS changes *which* requests are
   admitted in a step, never how many nor how much work they bring;
   and where the routing is captured, a guard scores each reordering on the real routing and
   keeps FCFS while they lose (:mod:`caps_vllm.guard`);
5. everything else keeps its order.
Below ``min_batch_trigger`` waiting requests the order is not touched. Under the priority
policy only the leading requests of the best priority are reordered, so a lower priority never
overtakes a higher one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Generic, TypeVar

import numpy as np

from caps_vllm.config import CapsConfig
from caps_vllm.guard import FcfsGuard
from caps_vllm.strategies import PairwiseCache, make_strategy

T = TypeVar("T")


@dataclass(slots=True)
class Waiting(Generic[T]):
    """What the planner reads of one waiting request (built for the queue's head every step:
    not frozen, whose field-by-field __setattr__ costs four times as much)."""

    item: T
    key: Hashable
    arrival: float  # seconds, same clock as ``now``
    preempted: bool = False
    priority: int = 0
    need: int = 1  # tokens vLLM would compute for it this step (prompt left, capped by the threshold)


@dataclass(frozen=True, slots=True)
class Capacity:
    """What vLLM has left for new requests this step (an estimate; vLLM enforces the real budgets).

    ``tokens``: the token budget after the running requests' tokens; ``kv_tokens``: free KV
    cache, in tokens, after the blocks the running requests take this step; None: not a limit.
    ``chunked``: a prompt longer than the budget left is admitted as a chunk (chunked prefill)
    instead of stopping admission. ``block_size``: a request takes whole KV blocks.
    """

    slots: int
    tokens: int | None = None
    kv_tokens: int | None = None
    chunked: bool = True
    block_size: int = 1


def fcfs_admissions(needs: Iterable[int], cap: Capacity) -> int:
    """How many requests of ``needs`` (queue order) vLLM would admit this step in that order."""
    return admitted_tokens(needs, cap)[0]


def admitted_tokens(needs: Iterable[int], cap: Capacity) -> tuple[int, int]:
    """(requests, prompt tokens) vLLM would admit this step from ``needs`` in that order."""
    slots, tokens, kv = cap.slots, cap.tokens, cap.kv_tokens
    n = total = 0
    for need in needs:
        if slots <= 0 or (tokens is not None and tokens <= 0):
            break
        take = need if tokens is None else min(need, tokens)
        blocks = -(-take // cap.block_size) * cap.block_size  # the KV it takes, in whole blocks
        if (tokens is not None and need > tokens and not cap.chunked) or (kv is not None and blocks > kv):
            break
        n += 1
        total += take
        slots -= 1
        if tokens is not None:
            tokens -= take
        if kv is not None:
            kv -= blocks
    return n, total


@dataclass
class AdmissionStats:
    """Cumulative counters (exported as metrics by the scheduler)."""

    engaged: int = 0  # steps with a decision: vLLM would admit some but not all waiting requests
    plans: int = 0  # steps where the strategy ranked a window
    reordered: int = 0  # steps whose admitted set differs from FCFS's (as estimated)
    fcfs_fallback: int = 0  # steps left in FCFS order because fewer than min_batch_trigger waited
    ranked: int = 0  # requests ranked by the strategy into the admission places
    bypassed: int = 0  # requests admitted ahead of the strategy by the max-wait rule (once each)
    pinned: int = 0  # requests put ahead of the strategy after max_passes passes (once each)
    kept_fcfs: int = 0  # plans where FCFS's admissions were kept: the pick gained no more than min_gain, or
    # vLLM would have admitted another number of requests or fewer tokens from it
    no_vector: int = 0  # window requests kept in FCFS position for lack of a prediction
    guard_fallback: int = 0  # planned steps left FCFS because the live guard tripped (caps_vllm.guard)
    last_selection_s: float = 0.0  # wall time of the last plan that ranked a window

    def since(self, earlier: AdmissionStats) -> AdmissionStats:
        """What happened after ``earlier`` (a copy taken then): the counts' differences, the last selection time."""
        diff = {f.name: getattr(self, f.name) - getattr(earlier, f.name) for f in fields(self)}
        return AdmissionStats(**{**diff, "last_selection_s": self.last_selection_s})


class AdmissionPlanner:
    def __init__(self, cfg: CapsConfig, d: int, deployment: dict | None = None) -> None:
        """``deployment``: what the strategy may know of the serving setup (see make_strategy)."""
        self.cfg = cfg
        self.d = d
        try:
            self.strategy = make_strategy(cfg.strategy, seed=cfg.seed, deployment=deployment, **cfg.strategy_params)
        except ValueError as exc:
            raise ValueError(f"caps.strategy_params: {exc}") from None
        self.pairs = PairwiseCache(
            d, capacity=max(64, 2 * cfg.window_size), terms=self.strategy.row_terms, gram=self.strategy.uses_gram
        )
        self.stats = AdmissionStats()
        self._bypassed: set[Hashable] = set()  # each request is counted once by the max-wait rule
        self.passes: dict[Hashable, int] = {}  # steps each waiting request was passed over in
        self._masses: dict[Hashable, float] = {}  # each waiting request's vector sum, computed once
        self.guard: FcfsGuard | None = None  # set by the scheduler where routing is captured
        self._decision: tuple | None = None  # this plan's reordering, as the guard scores it

    def engaged(self, queue_len: int, admits: int) -> bool:
        """Whether there is a decision: vLLM would admit ``admits`` (>= 1) of ``queue_len`` (counted)."""
        if queue_len == 0 or admits <= 0:
            return False
        if queue_len < self.cfg.min_batch_trigger:
            self.stats.fcfs_fallback += 1
            return False
        if queue_len <= admits:
            return False  # everybody gets in
        self.stats.engaged += 1
        return True

    def plan(
        self,
        waiting: Sequence[Waiting[T]],
        vector_of: Callable[[T], np.ndarray | None],
        running_load: np.ndarray,
        capacity: Capacity | int,
        now: float,
        by_priority: bool = False,
        queue_len: int | None = None,
        admits: int | None = None,
    ) -> list[T] | None:
        """The new order of ``waiting``, or None to keep the current one.

        ``capacity``: what vLLM has left this step (an int: free sequence slots only).
        ``waiting`` may be just the head of a longer queue (``queue_len`` requests): the
        requests FCFS would admit plus ``window_size`` are all the rules can move, since the
        tail is in arrival order and younger than them. A caller that already asked
        :meth:`engaged` passes the FCFS admission count as ``admits``.
        """
        cap = capacity if isinstance(capacity, Capacity) else Capacity(slots=int(capacity))
        n = len(waiting) if queue_len is None else queue_len
        k = admits
        if k is None:
            k = fcfs_admissions((w.need for w in waiting), cap)
            if not self.engaged(n, k):
                return None
        started = time.perf_counter()
        g = len(waiting)
        if by_priority:
            g = next((i for i, w in enumerate(waiting) if w.priority != waiting[0].priority), g)
        group = waiting[:g]
        alive = {w.key for w in group}
        front: list[Waiting[T]] = []  # preempted
        overdue: list[Waiting[T]] = []
        pinned: list[Waiting[T]] = []  # passed over max_passes times
        pool: list[Waiting[T]] = []
        oldest_ok = -math.inf if self.cfg.max_wait_ms is None else now - self.cfg.max_wait_ms / 1000.0
        for w in group:
            if w.preempted:
                front.append(w)
            elif w.arrival < oldest_ok:
                overdue.append(w)
            elif self.passes.get(w.key, 0) >= self.cfg.max_passes:
                pinned.append(w)
            else:
                pool.append(w)
        self._bypassed &= alive
        for w in overdue:
            if w.key not in self._bypassed:
                self._bypassed.add(w.key)
                self.stats.bypassed += 1
        self.passes = {key: c for key, c in self.passes.items() if key in alive}
        if len(self._masses) > 2 * len(alive) + 64:  # amortised: the ones no longer waiting go
            self._masses = {key: m for key, m in self._masses.items() if key in alive}
        ahead = front + overdue + pinned
        places = fcfs_admissions((w.need for w in ahead + pool), cap) - len(ahead)
        window, beyond = pool[: max(places, 0) + self.cfg.window_size], pool[max(places, 0) + self.cfg.window_size :]
        order = list(range(len(window)))
        self._decision = None
        if places >= 1 and len(window) > places:
            order = self._choose(window, vector_of, running_load, ahead, places)
            self.stats.plans += 1
            self.stats.ranked += places
            self.stats.last_selection_s = time.perf_counter() - started
        self.pairs.retain(alive)
        new = ahead + [window[i] for i in order] + beyond
        n_new = None
        if any(a is not b for a, b in zip(new, group)):
            (n_new, t_new), (n_fcfs, t_fcfs) = (admitted_tokens((w.need for w in o), cap) for o in (new, group))
            slots_bind = n_fcfs == cap.slots and (cap.tokens is None or max(t_new, t_fcfs) < cap.tokens)
            if n_new != n_fcfs or (t_new < t_fcfs and not slots_bind):
                self.stats.kept_fcfs += 1  # CAPS changes which requests vLLM admits, not how many nor how much
                new, n_new, self._decision = list(group), n_fcfs, None
            elif self.guard is not None and self.guard.tripped:
                self.stats.guard_fallback += 1  # decided in the shadow, for the guard to score: FCFS
                new = list(group)  # as many admitted as from CAPS's order (just checked)
        if self._decision is not None and self.guard is not None:
            self.guard.decided(*self._decision)
        admitted = new[: fcfs_admissions((w.need for w in new), cap) if n_new is None else n_new]
        self._count_passes(new, admitted)
        if all(a is b for a, b in zip(new, group)):
            return None
        if {w.key for w in admitted} != {w.key for w in group[:k]}:
            self.stats.reordered += 1
        return [w.item for w in new] + [w.item for w in waiting[g:]]

    def _choose(self, window, vector_of, running_load, ahead, places: int) -> list[int]:
        """Window positions in admission order: the strategy's ``places`` picks, then the rest (FCFS)."""
        load = running_load.copy()
        for w in ahead:
            v = vector_of(w.item)
            if v is not None:
                load += v
        vecs = [vector_of(w.item) for w in window]
        scored = [i for i, v in enumerate(vecs) if v is not None]
        picked: list[int] = []
        b = min(places, len(scored))
        priced = scored and hasattr(self.strategy, "cost")
        if priced:
            # Nothing can gain more than FCFS's admissions add to the step beyond the least any b
            # candidates must add (a step costs at least the load already there): when that is
            # within min_gain, keep them without choosing.
            fcfs = vecs[scored[0]].copy()  # FCFS's b summed in place (np.add.reduce's order, without its copy)
            for i in scored[1:b]:
                fcfs += vecs[i]
            base_ms, fcfs_ms = self.strategy.cost(np.stack([load, load + fcfs]))
            room = fcfs_ms - base_ms
            if room > self.cfg.min_gain * fcfs_ms:
                masses = self._masses
                for i in scored:
                    if window[i].key not in masses:
                        masses[window[i].key] = float(vecs[i].sum())
                room -= self.strategy.least_increase(np.sort([masses[window[i].key] for i in scored])[:b])
            if room <= self.cfg.min_gain * fcfs_ms:
                self.stats.kept_fcfs += 1
                self.stats.no_vector += len(window) - len(scored)
                return list(range(len(window)))
        if scored:
            missing = [i for i in scored if window[i].key not in self.pairs]
            self.pairs.add_many([window[i].key for i in missing], [vecs[i] for i in missing])
            keys = [window[i].key for i in scored]
            cand, gram = self.pairs.window(keys)
            terms = self.pairs.terms(keys)
            # Strategies keep their index 0 first; a zero "nothing" candidate there leaves
            # every real request free to be picked (or not) on its merits (its terms are 0 too).
            cand = np.vstack([np.zeros((1, cand.shape[1])), cand])
            gram = np.pad(gram, ((1, 0), (1, 0))) if gram is not None else None
            terms = np.vstack([np.zeros((1, terms.shape[1])), terms]) if terms is not None else None
            picks = [p - 1 for p in self.strategy.select(load, cand, b + 1, gram=gram, checked=True, terms=terms)[1:]]
            if priced and sorted(picks) != list(range(b)):
                # Never worse than FCFS by the step model: its b oldest unless the pick gains enough.
                gain = fcfs_ms - self.strategy.cost((load + cand[1:][picks].sum(axis=0))[None, :])[0]
                if gain <= self.cfg.min_gain * fcfs_ms:
                    picks = list(range(b))
                    self.stats.kept_fcfs += 1
                else:  # for the live guard, if the order is taken
                    self._decision = (
                        [window[scored[p]].key for p in picks],
                        [window[i].key for i in scored[:b]],
                        load,
                        gain,
                    )
            picked = [scored[p] for p in picks]
        self.stats.no_vector += len(window) - len(scored)
        # Requests without a vector keep their FCFS place; the picked ones, then the others, fill the rest.
        chosen = set(picked)
        it = iter(picked + [i for i in scored if i not in chosen])
        return [i if vecs[i] is None else next(it) for i in range(len(window))]

    def _count_passes(self, new: list[Waiting[T]], admitted: list[Waiting[T]]) -> None:
        """A request left waiting while a younger one (of ``admitted``, the head of ``new``) is
        admitted ahead of it is passed over once."""
        if not admitted:
            return
        youngest = max(w.arrival for w in admitted)
        keys = {w.key for w in admitted}
        for w in new[len(admitted) :]:
            if w.arrival < youngest and w.key not in keys:
                c = self.passes.get(w.key, 0) + 1
                self.passes[w.key] = c
                if c == self.cfg.max_passes:
                    self.stats.pinned += 1
