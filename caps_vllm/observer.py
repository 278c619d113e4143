"""Turns scheduler steps and routing records into CAPS's metrics.

Kept apart from the scheduler (which only decides order) and free of vLLM, so what each figure
means is tested on plain arrays: the predicted load of a step is every scheduled request's
per-token prediction times its scheduled tokens; the actual load is what the routers counted;
a request's predictor accuracy compares the prediction over exactly the prompt positions that
were routed (prefix-cache hits are never routed) with what was routed for them.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from caps_vllm.logs import WarnOnce
from caps_vllm.metrics import CapsMetrics
from caps_vllm.routing import RoutingRecord, cosine, load_shape, load_shapes, topk_overlap

logger = logging.getLogger("caps_vllm.observer")


class RoutingObserver:
    """Per-engine state behind the metrics: prompt-count accumulators, warn-once flags."""

    def __init__(
        self,
        metrics: CapsMetrics,
        predict: Callable[[Sequence[int]], np.ndarray | None] | None,
        layers: int,
        num_experts: int,
        top_k: int,
        batch_steps: int = 16,
        per_token: bool = False,
    ) -> None:
        """``batch_steps``: the per-step figures (counters, the predicted and actual loads' shapes)
        are computed and exported for this many steps at once (they lag by at most that many
        steps; :meth:`flush` exports the rest). ``per_token``: the scheduler's vectors are routing
        per token already (they sum to layers x top_k), so they are summed as they are."""
        self.per_token = per_token
        self.metrics = metrics
        self.batch_steps = max(int(batch_steps), 1)
        # predicted loads of the steps not yet exported, written in place (no allocation a step)
        self._pending = np.zeros((self.batch_steps, layers * num_experts))
        self._held = 0  # of its rows
        self._scratch = np.zeros(layers * num_experts)
        self._pending_actual: list[np.ndarray] = []  # routed loads of steps not yet exported
        self._counts: Counter[str] = Counter()  # counter increments not yet exported
        self.predict = predict  # prompt ids -> flat [layers * experts] counts, or None
        self.shape = (layers, num_experts)
        self.top_k = top_k
        self._prompts: dict[str, tuple[int, np.ndarray]] = {}  # req -> (first routed position, counts)
        # The requests scheduled last step -> per-token prediction (the scheduler's own array, not
        # a copy: with a few joining each step, a row copy costs more than the sum), and their sum.
        self._units: dict[str, np.ndarray | None] = {}
        self._sum = np.zeros(layers * num_experts)
        self._decodes: dict[str, tuple[np.ndarray | None, np.ndarray]] = {}  # req -> (prediction, decode counts)
        self._warn_once = WarnOnce(logger)

    def on_schedule(
        self,
        scheduled: Mapping[str, int],
        vector_of: Callable[[str], np.ndarray | None],
        total: int | None = None,
        changes: tuple[Iterable[str], Iterable[str]] | None = None,
        multi: Iterable[str] | None = None,
    ) -> None:
        """A step was scheduled: ``scheduled`` maps request id -> tokens this step (``total`` of them).

        The predicted load is kept as a running sum of the scheduled requests' per-token
        vectors, updated by the changes since the last step (a decode step costs O(changes x d),
        not O(R x d)), plus (n - 1) x vector for the few requests with more than one token
        (prefill chunks). A caller that knows them passes ``changes`` (ids that joined, ids that
        left: new and resumed, finished and preempted) and ``multi`` (the only ids that may have
        more than one token); otherwise, or when the ids do not add up (a running request the
        budget left out), both come from passes over every id.
        """
        total = sum(scheduled.values()) if total is None else total
        if total == 0:
            return
        counts = self._counts
        counts["vllm:caps_steps"] += 1
        counts["vllm:caps_scheduled_tokens"] += total
        units = self._units
        if changes is not None:
            joined, left = changes
            self._drop(sorted(rid for rid in left if rid not in scheduled))
            self._add([rid for rid in joined if rid in scheduled and rid not in units], vector_of)
        if changes is None or len(units) != len(scheduled):  # set differences: C speed, O(R)
            self._drop(sorted(units.keys() - scheduled.keys()))
            self._add(sorted(scheduled.keys() - units.keys()), vector_of)
            multi = None
        load = self._pending[self._held]
        load[:] = self._sum
        if total != len(scheduled):  # some request has more than one token (every one has at least one)
            for rid in scheduled.keys() if multi is None else multi:
                n = scheduled.get(rid, 0)
                u = units.get(rid) if n > 1 else None
                if u is not None:
                    load += np.multiply(u, n - 1, out=self._scratch)
        self._held += 1
        if self._held >= self.batch_steps:
            self.flush()

    def flush(self) -> None:
        """Export the figures of the steps batched so far."""
        m = self.metrics
        for name, amount in self._counts.items():
            m.inc(name, amount)
        self._counts.clear()
        predicted = self._pending[: self._held].reshape(self._held, *self.shape)
        actual = np.stack(self._pending_actual).reshape(-1, *self.shape) if self._pending_actual else predicted[:0]
        for source, loads in (("predicted", predicted), ("actual", actual)):
            if len(loads):
                m.observe_loads(source, [shape for shape in load_shapes(loads) if shape is not None])
        self._held = 0
        self._pending_actual.clear()

    def _drop(self, ids: Iterable[str]) -> None:
        for rid in ids:
            u = self._units.pop(rid, None)
            if u is not None:
                self._sum -= u
        if not self._units:
            self._sum[:] = 0.0  # nothing scheduled: no float residue either

    def _add(self, ids: Iterable[str], vector_of: Callable[[str], np.ndarray | None]) -> None:
        for rid in ids:
            u = self._units[rid] = self._unit(vector_of(rid))
            if u is not None:
                self._sum += u

    def _unit(self, v: np.ndarray | None) -> np.ndarray | None:
        """A prediction as routing per token (sums to layers x top_k), or None."""
        if v is None or v.shape != self._sum.shape:
            return None
        if self.per_token:
            return v
        mass = v.sum()
        return v * (self.shape[0] * self.top_k / mass) if mass > 0 else None

    def on_admission(
        self,
        admitted: int,
        ranked: int | None,
        bypassed: int,
        no_vector: int,
        selection_s: float | None,
        engaged: int = 0,
        reordered: int = 0,
        pinned: int = 0,
        kept_fcfs: int = 0,
        guard_fallback: int = 0,
    ) -> None:
        """What one scheduling step did with the queue; ``ranked`` is None if CAPS left it FCFS
        (counted now, exported with the step's other figures)."""
        counts = self._counts
        for name, amount in (
            ("vllm:caps_engaged_steps", engaged),
            ("vllm:caps_reordered_steps", reordered),
            ("vllm:caps_pass_over_pinned_requests", pinned),
            ("vllm:caps_kept_fcfs_steps", kept_fcfs),
            ("vllm:caps_guard_fallback_steps", guard_fallback),
            ("vllm:caps_admitted_requests", admitted),
            ("vllm:caps_max_wait_bypass_requests", bypassed),
            ("vllm:caps_predictor_fallback_requests", no_vector),
            ("vllm:caps_fcfs_fallback_requests", admitted if ranked is None else 0),
            ("vllm:caps_ranked_requests", ranked or 0),
        ):
            if amount:
                counts[name] += amount
        if selection_s is not None:
            self.metrics.observe("vllm:caps_selection_seconds", selection_s)

    def on_output(
        self, record: RoutingRecord | None, prompt_of: Callable[[str], tuple[Sequence[int], bool] | None]
    ) -> None:
        """A step's routing came back; ``prompt_of(req)`` gives (prompt ids, prompt fully routed),
        or None for a request that is gone."""
        if record is None:
            return
        self._counts["vllm:caps_routed_tokens"] += record.num_tokens
        if record.layer_counts.shape == self.shape:
            self._pending_actual.append(record.layer_counts)
            if len(self._pending_actual) >= self.batch_steps:
                self.flush()
        else:
            shape = load_shape(record.layer_counts)
            if shape is not None:
                self.metrics.observe_load("actual", shape)
        if self.predict is None or not (record.prompt_counts or self._prompts or record.decode_counts or self._decodes):
            return
        if record.layer_counts.shape != self.shape:
            self._warn_once(
                "shape",
                "CAPS: routing has shape %s, the predictor %s; predictor accuracy is not measured",
                record.layer_counts.shape,
                self.shape,
            )
            return
        for rid, counts in record.prompt_counts.items():
            start, acc = self._prompts.get(rid, (record.prompt_start.get(rid, 0), None))
            self._prompts[rid] = (start, counts if acc is None else acc + counts)
        for rid in list(self._prompts):
            info = prompt_of(rid)
            if info is None:
                del self._prompts[rid]  # finished or aborted before its prompt was routed
                continue
            ids, done = info
            if done:
                start, acc = self._prompts.pop(rid)
                self._score(ids[start:], acc, "vllm:caps_predictor")
        self._on_decode(record, prompt_of)

    def _on_decode(self, record: RoutingRecord, prompt_of) -> None:
        """Accumulate each request's decode counts (scored by ``on_finished``)."""
        for rid, counts in record.decode_counts.items():
            if rid in self._decodes:
                pred, acc = self._decodes[rid]
                self._decodes[rid] = (pred, acc + counts)
                continue
            info = prompt_of(rid)
            pred = None if info is None else self.predict(info[0])
            self._decodes[rid] = (None if pred is None else pred.reshape(self.shape), counts.copy())

    def on_finished(self, request_ids, score: bool = True) -> None:
        """Requests that finished (``score``) or were aborted: their decode tokens against their prompt's prediction."""
        for rid in request_ids:
            pred, acc = self._decodes.pop(rid, (None, None))
            if score and pred is not None:
                self._observe_accuracy(pred, acc, "vllm:caps_predictor_decode")

    def _score(self, ids: Sequence[int], actual: np.ndarray, prefix: str) -> None:
        predicted = self.predict(ids)
        if predicted is not None:
            self._observe_accuracy(predicted.reshape(self.shape), actual, prefix)

    def _observe_accuracy(self, predicted: np.ndarray, actual: np.ndarray, prefix: str) -> None:
        cos = cosine(predicted, actual)
        overlap = topk_overlap(predicted, actual, self.top_k)
        if cos is not None:
            self.metrics.observe(f"{prefix}_cosine", cos)
        if overlap is not None:
            self.metrics.observe(f"{prefix}_topk_overlap", overlap)

    def on_learning(self, recall) -> None:
        """One step's prequential recall counts of the learning table and of the dry run."""
        m = self.metrics
        m.inc("vllm:caps_learning_routed_picks", recall.picks)
        m.inc_labeled("vllm:caps_learning_hits", "learned", recall.learned_hits)
        m.inc_labeled("vllm:caps_learning_hits", "dry_run", recall.prior_hits)
