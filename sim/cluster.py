"""Several twin engines: data-parallel engines or replicas behind a front end, with or without
expert parallelism.

* Without EP, engines are independent (each its own clock): R replicas behind a router, or D
  data-parallel engines of one server. Events run in time order: an arrival is dispatched when
  no engine is behind it, and an engine steps when it is the one furthest behind.
* With EP, the D engines step in lockstep, as vLLM runs them (an idle engine runs a dummy
  batch): one step takes the slowest engine's non-MoE part plus, per MoE layer, the slowest
  rank over the tokens of *all* engines, plus an all-to-all term (see :class:`ExpertParallel`).

A :class:`Dispatch` policy picks the engine for each request when it arrives: vLLM 0.32's
least-loaded rule (``DPLBAsyncMPClient.get_core_engine_for_request``), round-robin, or any
other (an expert-affinity policy plugs in here).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from caps_vllm.step_cost import expert_placement, rank_sums
from sim.twin import Engine, TwinRequest


class Dispatch:
    """Picks an engine index for a request; sees the engines as they are at its arrival."""

    name = "dispatch"

    def choose(self, request: TwinRequest, engines: Sequence[Engine]) -> int:
        raise NotImplementedError


class RoundRobin(Dispatch):
    name = "round_robin"

    def __init__(self) -> None:
        self.next = 0

    def choose(self, request, engines) -> int:
        i = self.next % len(engines)
        self.next += 1
        return i


class LeastLoaded(Dispatch):
    """vLLM 0.32's rule: score = max(in flight, waiting + running), plus, when requests wait,
    ``6 x waiting x max(0, KV usage - 0.5)``; the lowest score wins, the scan starting one engine
    later after each pick so that ties rotate. vLLM reads waiting/running/KV usage from a
    snapshot the DP coordinator publishes every ``snapshot_s`` (100 ms) and counts its own
    dispatches as waiting in between; in flight is the front end's own, always current count.
    ``snapshot_s=0``: the engines' current state."""

    name = "least_loaded"

    def __init__(self, snapshot_s: float = 0.1) -> None:
        self.start = 0
        self.snapshot_s = snapshot_s
        self._snap: list[list[float]] | None = None
        self._snap_t = float("-inf")

    def _loads(self, now: float, engines) -> list[list[float]]:
        if (
            self.snapshot_s > 0
            and self._snap is not None
            and len(self._snap) == len(engines)
            and now < self._snap_t + self.snapshot_s
        ):
            return self._snap
        self._snap = [
            [len(e.scheduler.waiting) + len(e.inbox), len(e.scheduler.running), e.scheduler.kv_cache_manager.usage]
            for e in engines
        ]
        if self.snapshot_s > 0:
            self._snap_t = now - now % self.snapshot_s  # the coordinator's clock ticks on its own
        return self._snap

    def choose(self, request, engines) -> int:
        loads = self._loads(getattr(request, "arrival_s", 0.0), engines)
        best, best_score = 0, float("inf")
        n = len(engines)
        for k in range(n):
            i = (self.start + k) % n
            waiting, running, usage = loads[i]
            score = float(max(engines[i].in_flight, waiting + running))
            if waiting:
                score += waiting * 6.0 * max(0.0, usage - 0.5)
            if score < best_score:
                best, best_score = i, score
        self.start = (self.start + 1) % n
        loads[best][0] += 1  # counted as waiting there until the next snapshot
        return best


class ExpertParallel:
    """The step of D engines in lockstep under expert parallelism (one rank per engine, vLLM's
    ``--expert-placement-strategy``): the slowest engine's non-MoE part, and per MoE layer the
    slowest rank over every engine's tokens plus an all-to-all of each token's hidden state to
    its experts' ranks and back (``2 x tokens x top_k x hidden x 2 bytes`` over ``link_bw`` per
    rank: an assumption, NVLink-class by default)."""

    def __init__(self, model, shape, ranks: int, placement: str = "linear", link_bw: float = 450e9) -> None:
        self.model, self.shape = model, shape  # sim.step_time.RooflineStep, ModelShape
        self.placement = expert_placement(shape.experts, ranks, placement)
        self.ranks, self.link_bw = ranks, link_bw

    def seconds(self, batches: list) -> tuple[float, np.ndarray]:
        """(seconds, per-rank max/mean load per layer) of one lockstep step of ``batches``
        (one StepBatch per engine; an idle engine's has no tokens)."""
        s, m = self.shape, self.model
        dense = max(m.dense_seconds(b) for b in batches)
        counts = sum(b.moe_counts for b in batches)
        expected = any(b.expected for b in batches)
        per_expert = m.moe.expert_ms(counts, expected)
        ranks = rank_sums(per_expert, self.placement)  # [layers, ranks] milliseconds
        tokens = sum(b.tokens for b in batches)
        a2a = 2.0 * tokens * s.top_k * s.hidden * s.dtype_bytes / (self.ranks * self.link_bw)
        moe = float(ranks.max(axis=-1).sum()) / 1e3 + len(s.moe_layers) * a2a
        loads = rank_sums(counts, self.placement)
        mean = loads.mean(axis=-1)
        imbalance = np.where(mean > 0, loads.max(axis=-1) / np.where(mean > 0, mean, 1.0), 1.0)
        return m.hw.fixed_s + dense + moe, imbalance


class Cluster:
    """D engines behind one dispatch policy; ``step_batch(engine, out)`` reads one engine's
    step (a StepBatch), ``price(batch)`` prices an independent engine's step, ``ep`` (an
    ExpertParallel) prices lockstep steps instead."""

    def __init__(
        self,
        engines: list[Engine],
        dispatch: Dispatch,
        step_batch: Callable,
        price: Callable | None = None,
        ep: ExpertParallel | None = None,
    ) -> None:
        if (price is None) == (ep is None):
            raise ValueError("give price (independent engines) or ep (lockstep), not both")
        self.engines, self.dispatch, self.step_batch, self.price, self.ep = engines, dispatch, step_batch, price, ep
        self.rank_imbalance: list[float] = []  # per lockstep step: mean over layers of max/mean rank load

    def run(self, requests: Sequence[TwinRequest], progress: Callable[[float], None] | None = None) -> None:
        """Serve ``requests``; ``progress(now)`` is called after every step."""
        pending = sorted(requests, key=lambda r: (r.arrival_s, r.rid))
        if len({r.rid for r in pending}) != len(pending):
            raise ValueError("cluster: request ids must be unique")
        self.progress = progress or (lambda now: None)
        if self.ep is not None:
            self._lockstep(pending)
        else:
            self._independent(pending)

    def result(self):
        """The engines' results as one TwinResult (every engine's steps, in engine order)."""
        from sim.twin import TwinResult

        served = {k: v for e in self.engines for k, v in e.served.items()}
        steps = [st for e in self.engines for st in e.steps]
        return TwinResult(
            served,
            steps,
            sum(e.busy_s for e in self.engines),
            max(e.now for e in self.engines),
            [rid for e in self.engines for rid in e.finished],
        )

    def _independent(self, pending: list[TwinRequest]) -> None:
        i, engines = 0, self.engines
        while i < len(pending) or any(e.has_work() for e in engines):
            busy = [e for e in engines if e.has_work()]
            behind = min(busy, key=lambda e: e.now) if busy else None
            if i < len(pending) and (behind is None or pending[i].arrival_s <= behind.now):
                r = pending[i]
                for e in engines:  # an idle engine's clock catches up with the arrival
                    if not e.has_work():
                        e.now = max(e.now, r.arrival_s)
                engines[self.dispatch.choose(r, engines)].dispatch(r)
                i += 1
                continue
            out = behind.begin()
            if out is not None:
                b = self.step_batch(behind, out)
                behind.finish(out, self.price(b), b.moe_counts, b.expected)
                self.progress(behind.now)

    def _lockstep(self, pending: list[TwinRequest]) -> None:
        i, engines = 0, self.engines
        now = 0.0
        while i < len(pending) or any(e.has_work() for e in engines):
            while i < len(pending) and pending[i].arrival_s <= now:
                engines[self.dispatch.choose(pending[i], engines)].dispatch(pending[i])
                i += 1
            if not any(e.has_work() for e in engines):
                now = pending[i].arrival_s
                for e in engines:
                    e.now = now
                continue
            outs = [e.begin() for e in engines]
            for e in engines:
                e.now = now  # begin() may jump an idle engine's clock: lockstep keeps one clock
            active = [(e, o) for e, o in zip(engines, outs) if o is not None]
            if not active:  # nothing could be scheduled: wait for the next arrival
                if i >= len(pending):
                    raise RuntimeError("cluster: nothing can be scheduled and no request will arrive")
                now = pending[i].arrival_s
                continue
            batches = [self.step_batch(e, o) for e, o in active]
            dt, imbalance = self.ep.seconds(batches)
            for (e, o), b in zip(active, batches):
                e.finish(o, dt, b.moe_counts, b.expected)
            now += dt
            for e in engines:
                e.now = now
            self.rank_imbalance.append(float(imbalance.mean()))
            self.progress(now)


class ExpertAffinity(Dispatch):
    """CAPS's expert-affinity dispatch (:class:`caps_vllm.dispatch.AffinityDispatcher`) over the
    twin's engines. ``vector_of(request)``: its per-token load, the prompt's routing (what CAPS's
    predictor is told) or, for the oracle, its decode tokens' own routing."""

    name = "expert_affinity"

    def __init__(
        self, engines: int, d: int, cost, vector_of: Callable, margin: int = 8, objective: str = "step"
    ) -> None:
        from caps_vllm.dispatch import AffinityDispatcher

        self.policy = AffinityDispatcher(engines, d, cost, margin, objective=objective)
        self.vector_of = vector_of
        self._released = [0] * engines  # per engine: finished requests already taken off

    @property
    def overrides(self) -> int:
        return self.policy.overrides

    def choose(self, request, engines) -> int:
        for k, e in enumerate(engines):
            for rid in e.finished[self._released[k] :]:
                self.policy.finished(rid)
            self._released[k] = len(e.finished)
        v = self.vector_of(request)
        replica = self.policy.choose(v).replica
        self.policy.started(request.rid, replica, v)
        return replica


class DomainOracle(Dispatch):
    """Expert-affinity dispatch with the requests' true domains (an oracle: the upper bound a
    predictor-driven policy can approach): domain k goes to engine k mod D, unless that engine
    has more than ``margin`` requests in flight above the least loaded one (the load guard),
    in which case the least-loaded rule picks."""

    name = "domain_oracle"

    def __init__(self, domains: Sequence[str], margin: int = 8, snapshot_s: float = 0.1) -> None:
        self.home = {d: k for k, d in enumerate(domains)}
        self.margin = margin
        self.fallback = LeastLoaded(snapshot_s)
        self.overrides = 0

    def choose(self, request, engines) -> int:
        i = self.home.get(request.domain, 0) % len(engines)
        low = min(e.in_flight for e in engines)
        if engines[i].in_flight > low + self.margin:
            self.overrides += 1
            return self.fallback.choose(request, engines)
        return i
