"""The CAPS scheduler for vLLM: ``--scheduler-cls caps_vllm.CapsScheduler``.

It only decides *order*: before vLLM's own ``schedule()`` runs, it reorders the waiting queue
with :class:`~caps_vllm.admission.AdmissionPlanner`; vLLM then admits from the front while its
budgets allow (tokens, KV blocks, max sequences, LoRA, prefix cache, connectors, speculative
decoding), exactly as with the stock class.

Everything CAPS adds runs on the EngineCore busy-loop thread inside ``schedule()``: the
running-load update (O(changes x d)), lazy prediction of the requests that enter the window
(a gather and a bincount over their prompt tokens, once per request), and the selection.
Nothing runs while fewer than ``min_batch_trigger`` requests wait. Any error in CAPS is
logged once and that step is left in FCFS order: the scheduler never crashes the engine.

``CapsScheduler`` picks the synchronous or the asynchronous base class from
``scheduler_config.async_scheduling``, so the async overlap on GPUs is kept.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter

import numpy as np
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import FCFSRequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from caps_vllm.admission import AdmissionPlanner, Waiting
from caps_vllm.config import CapsConfig
from caps_vllm.predictor import ExpertPredictor, PredictorUnavailable

logger = logging.getLogger("caps_vllm.scheduler")
_NO_VECTOR = object()


def _route_logs_through_vllm() -> None:
    """Show caps_vllm's INFO logs (table building, fallbacks) in vLLM's own log stream."""
    ours, theirs = logging.getLogger("caps_vllm"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


class PriorityOrderQueue(FCFSRequestQueue):
    """The priority policy as an ordered deque, so CAPS can reorder inside a priority level.

    Requests are kept in vLLM's priority order (``Request.__lt__``: priority, then arrival
    time, then id), inserted from the back, so new arrivals cost O(1) and vLLM's own order
    holds exactly until CAPS reorders the leading requests of the best priority.
    """

    def add_request(self, request: Request) -> None:
        i = len(self)
        while i > 0 and request < self[i - 1]:
            i -= 1
        self.insert(i, request)

    def prepend_request(self, request: Request) -> None:
        self.add_request(request)  # as in vLLM's priority queue: no front, only order

    def prepend_requests(self, requests) -> None:
        for request in requests:
            self.add_request(request)


class _CapsMixin:
    """Admission-order policy on top of a vLLM scheduler class."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        _route_logs_through_vllm()
        vllm_config = self.vllm_config
        raw = (vllm_config.additional_config or {}).get("caps")
        self.caps_config = CapsConfig.from_dict(raw)  # an invalid value stops startup here
        self.caps_counters: Counter[str] = Counter()
        self.caps_predictor = self._caps_load_predictor(vllm_config) if self.caps_config.predictor else None
        d = self.caps_predictor.d if self.caps_predictor is not None else 1
        self.caps_planner = AdmissionPlanner(self.caps_config, d)
        self._caps_running: dict[str, np.ndarray] = {}
        self._caps_running_load = np.zeros(d)
        self._caps_warned: set[str] = set()
        if self.policy == SchedulingPolicy.PRIORITY:
            self.waiting = PriorityOrderQueue()
        logger.info("CAPS scheduler (%s): %s", "async" if isinstance(self, AsyncScheduler) else "sync", self.caps_config)

    def _caps_load_predictor(self, vllm_config) -> ExpertPredictor | None:
        mc = vllm_config.model_config
        try:
            pred = ExpertPredictor.from_model(mc.model, getattr(mc, "revision", None), self.caps_config.cache_dir)
        except PredictorUnavailable as exc:
            logger.warning("CAPS predictor unavailable (%s): admission stays FCFS for this model", exc)
            return None
        vocab = mc.get_vocab_size() if hasattr(mc, "get_vocab_size") else pred.vocab
        if vocab != pred.vocab:
            logger.warning("CAPS router table covers %d token ids, the model %d: others are skipped", pred.vocab, vocab)
        return pred

    def _caps_warn_once(self, reason: str, msg: str, *args, log=logger.warning) -> None:
        if reason not in self._caps_warned:
            self._caps_warned.add(reason)
            log(msg, *args)

    def _caps_vector(self, request: Request) -> np.ndarray | None:
        """The request's predicted load, computed once and kept on the request."""
        v = getattr(request, "caps_vector", _NO_VECTOR)
        if v is not _NO_VECTOR:
            return v
        v, reason = None, None
        ids = request.prompt_token_ids
        if ids is None:
            reason = "prompt_embeds"
        else:
            if request.mm_features:
                keep = np.ones(len(ids), dtype=bool)
                for f in request.mm_features:
                    pos = f.mm_position
                    keep[pos.offset : pos.offset + pos.length] = False
                ids = np.asarray(ids)[keep]
            v = self.caps_predictor.vector(ids, per_token=self.caps_config.vectors == "per_token")
            if v is None:
                reason = "no_known_tokens"
        if reason is not None:
            self.caps_counters["predictor_fallback"] += 1
            self.caps_counters[f"predictor_fallback_{reason}"] += 1
            self._caps_warn_once(reason, "CAPS: a request has no predictable prompt tokens (%s); it keeps its FCFS "
                                 "place (counted, warned once per reason)", reason)
        request.caps_vector = v
        return v

    def _caps_update_running_load(self) -> np.ndarray:
        known = self._caps_running
        for req in self.running:
            if req.request_id not in known:
                v = self._caps_vector(req)
                v = v if v is not None else np.zeros_like(self._caps_running_load)
                known[req.request_id] = v
                self._caps_running_load += v
        if len(known) > len(self.running):
            current = {r.request_id for r in self.running}
            for rid in [rid for rid in known if rid not in current]:
                self._caps_running_load -= known.pop(rid)
        np.maximum(self._caps_running_load, 0.0, out=self._caps_running_load)  # float drift
        return self._caps_running_load

    def _caps_reorder(self) -> None:
        waiting = self.waiting
        max_active = getattr(self, "max_num_active_reqs", self.max_num_running_reqs)
        free = max_active - len(self.running) - getattr(self, "num_waiting_for_streaming_input", 0) \
            - len(getattr(self, "kv_holding_waiting", ()))
        if not self.caps_planner.engaged(len(waiting), free):
            return  # checked before any per-step work: most steps stop here
        # Only the head can move (see AdmissionPlanner.plan): O(window + free), not O(queue).
        head = [Waiting(r, r.request_id, r.arrival_time, r.status == RequestStatus.PREEMPTED, r.priority)
                for r in itertools.islice(waiting, self.caps_config.window_size + free)]
        order = self.caps_planner.plan(head, self._caps_vector, self._caps_update_running_load(), free, time.time(),
                                       by_priority=self.policy == SchedulingPolicy.PRIORITY, queue_len=len(waiting))
        if order is not None:
            assert len(order) == len(head), "CAPS must neither drop nor duplicate a request"
            new = order + list(itertools.islice(waiting, len(head), None))  # built before the queue is touched
            waiting.clear()
            waiting.extend(new)

    def schedule(self, *args, **kwargs):
        if self.caps_predictor is not None and self.waiting:
            try:
                self._caps_reorder()
            except Exception:  # never let the policy take the engine down
                self.caps_counters["errors"] += 1
                self._caps_warn_once("error", "CAPS admission failed; this step stays FCFS (further errors are only "
                                     "counted)", log=logger.exception)
        return super().schedule(*args, **kwargs)


class CapsAsyncScheduler(_CapsMixin, AsyncScheduler):
    """CAPS over vLLM's AsyncScheduler (GPU serving with async scheduling)."""


class CapsScheduler(_CapsMixin, Scheduler):
    """CAPS over vLLM's Scheduler; constructs :class:`CapsAsyncScheduler` when async is on."""

    def __new__(cls, *args, **kwargs):
        if cls is CapsScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                return CapsAsyncScheduler(*args, **kwargs)
        return super().__new__(cls)
