"""The CAPS scheduler for vLLM: ``--scheduler-cls caps_vllm.CapsScheduler``.

It only decides *order*: before vLLM's own ``schedule()`` runs, it reorders the waiting queue
with :class:`~caps_vllm.admission.AdmissionPlanner`; vLLM then admits from the front while its
budgets allow (tokens, KV blocks, max sequences, LoRA, prefix cache, connectors, speculative
decoding), exactly as with the stock class.

Everything CAPS adds runs on the EngineCore busy-loop thread inside ``schedule()``: the
running-load update (O(changes x d), then one weighted sum over the running requests on the
steps that make a choice), lazy prediction of the requests that enter the window
(a gather and a bincount over their prompt tokens, once per request), and the selection.
Nothing runs while fewer than ``min_batch_trigger`` requests wait. Any error in CAPS is
logged once and that step is left in FCFS order: the scheduler never crashes the engine.

``CapsScheduler`` picks the synchronous or the asynchronous base class from
``scheduler_config.async_scheduling``, so the async overlap on GPUs is kept.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import statistics
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import FCFSRequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from caps_vllm.admission import AdmissionPlanner, Capacity, Waiting, fcfs_admissions
from caps_vllm.blas import limit_threads
from caps_vllm.config import CapsConfig
from caps_vllm.guard import FcfsGuard
from caps_vllm.learner import OnlineLearner
from caps_vllm.plugin import OWNED_ENV, route_logs_through_vllm
from caps_vllm.predictor import ExpertPredictor, PredictorUnavailable
from caps_vllm.routing import RoutingRecord, counts_from_rows
from caps_vllm.running_load import RunningLoad
from caps_vllm.step_log import StepLog

logger = logging.getLogger("caps_vllm.scheduler")
_NO_VECTOR = object()
_WALK_ALL = 64  # up to this many running requests _caps_capacity reads every one (exact, and cheap)


def _steps_left(r: Request) -> int:
    """Decode steps a running request has left at most (it may stop early at EOS)."""
    return r.max_tokens - r.num_output_tokens


class _RunningPass(NamedTuple):
    """What one pass over the running batch keeps for the shared load: ids and decode steps left."""

    keys: list[str]
    remaining: list[int]


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
        route_logs_through_vllm()
        vllm_config = self.vllm_config
        raw = (vllm_config.additional_config or {}).get("caps")
        self.caps_config = CapsConfig.from_dict(raw)  # an invalid value stops startup here
        if self.caps_config.blas_threads is not None:
            lib = limit_threads(self.caps_config.blas_threads)
            logger.info("CAPS: numpy's BLAS on %s thread(s) in this process (%s)", self.caps_config.blas_threads,
                        lib or "no OpenBLAS found: left as it is")
        self.caps_counters: Counter[str] = Counter()
        self.caps_predictor = self._caps_load_predictor(vllm_config) if self.caps_config.predictor else None
        self.caps_learner = self._caps_make_learner()
        d = self.caps_predictor.d if self.caps_predictor is not None else 1
        self.caps_planner = AdmissionPlanner(self.caps_config, d, self._caps_deployment(vllm_config))
        self.caps_planner.guard = self._caps_make_guard()
        self.caps_running = RunningLoad(d, self.max_num_running_reqs)
        self._caps_busy: dict[str, Request] = {}  # running requests not (yet) known to be in plain decode
        self._caps_warned: set[str] = set()
        if self.policy == SchedulingPolicy.PRIORITY:
            self.waiting = PriorityOrderQueue()
        self.caps_observer = self._caps_make_observer(vllm_config) if self.caps_config.metrics else None
        self._caps_ranked_step: int | None = None
        self._caps_step = 0  # schedule() calls, in tokens a running request may take (the rows' end steps)
        self.caps_seconds = 0.0  # wall time of CAPS's own work in schedule() (the reordering), summed
        # Waiting times are measured on the clock vLLM stamps arrival_time with; the twin
        # (sim/twin.py) replaces it with its virtual clock.
        self.caps_clock = time.time
        self.caps_step_log = self._caps_make_step_log(vllm_config)
        logger.info("CAPS scheduler (%s): %s", "async" if isinstance(self, AsyncScheduler) else "sync", self.caps_config)

    def _caps_make_step_log(self, vllm_config) -> StepLog | None:
        path = self.caps_config.step_log
        if not path:
            return None
        pc = vllm_config.parallel_config
        if pc.data_parallel_size > 1:
            path = f"{path}.{pc.data_parallel_rank}"
        logger.info("CAPS step log: %s", path)
        return StepLog(path)

    @property
    def _caps_on(self) -> bool:
        """False for an object built without CAPS's __init__ (vLLM's tests do so): it acts as the stock class."""
        return "caps_config" in self.__dict__

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        if self._caps_on and self.caps_step_log is not None:
            self.caps_step_log.added(request)

    def finish_requests(self, request_ids, finished_status):
        aborted = super().finish_requests(request_ids, finished_status)
        if not self._caps_on:
            return aborted
        if self.caps_observer is not None:
            self.caps_observer.on_finished((r.request_id for r in aborted), score=False)
        if self.caps_step_log is not None:
            self.caps_step_log.dropped(r.request_id for r in aborted)
        return aborted

    def _caps_load_predictor(self, vllm_config) -> ExpertPredictor | None:
        mc = vllm_config.model_config
        try:
            pred = ExpertPredictor.from_model(mc.model, getattr(mc, "revision", None), self.caps_config.cache_dir)
        except PredictorUnavailable as exc:
            logger.warning("CAPS cannot predict expert loads for %s (%s): admission stays FCFS. CAPS is for "
                           "Mixture-of-Experts models whose router weights are on local disk; for a dense model "
                           "leave out --scheduler-cls and vLLM's own scheduler does the same with less work",
                           mc.model, exc)
            return None
        vocab = mc.get_vocab_size() if hasattr(mc, "get_vocab_size") else pred.vocab
        if vocab != pred.vocab:
            logger.warning("CAPS router table covers %d token ids, the model %d: others are skipped", pred.vocab, vocab)
        return pred

    def _caps_make_learner(self) -> OnlineLearner | None:
        cfg, pred = self.caps_config, self.caps_predictor
        if not (cfg.learn and cfg.capture) or not isinstance(pred, ExpertPredictor):
            return None
        return OnlineLearner(pred, cfg.learn_max_tokens, cfg.learn_half_life_tokens)

    def _caps_make_guard(self) -> FcfsGuard | None:
        """The live guard, where it can judge: routing captured, a priced strategy, per-token vectors."""
        cfg, pred, strategy = self.caps_config, self.caps_predictor, self.caps_planner.strategy
        if not (cfg.capture and cfg.guard_window and cfg.vectors == "per_token" and hasattr(strategy, "cost")) \
                or not isinstance(pred, ExpertPredictor):
            return None
        return FcfsGuard(strategy.cost, pred.layers * pred.top_k, cfg.guard_window)

    def shutdown(self) -> None:
        super().shutdown()
        if self._caps_on and self.caps_learner is not None:
            self.caps_learner.close()

    def _caps_deployment(self, vllm_config) -> dict:
        """Experts per layer and vLLM's expert-parallel layout, for deployment-aware strategies.

        vLLM's expert-parallel group spans data x tensor (x prefill-context) parallel ranks.
        Every data-parallel engine has its own scheduler, which sees only its own requests.
        """
        if self.caps_predictor is None:
            return {}
        pc = vllm_config.parallel_config
        ranks = 1
        if pc.enable_expert_parallel:
            ranks = pc.data_parallel_size * pc.tensor_parallel_size * getattr(pc, "prefill_context_parallel_size", 1)
            if getattr(pc, "enable_eplb", False):
                logger.warning("CAPS: EPLB moves experts while serving; deployment-aware strategies assume vLLM's "
                               "initial %s placement", pc.expert_placement_strategy)
        return {"experts": self.caps_predictor.num_experts, "ranks": ranks, "placement": pc.expert_placement_strategy}

    def _caps_make_observer(self, vllm_config):
        from caps_vllm.metrics import CapsMetrics, exported
        from caps_vllm.observer import RoutingObserver

        mc, pred = vllm_config.model_config, self.caps_predictor
        metrics = CapsMetrics(str(mc.served_model_name), str(vllm_config.parallel_config.data_parallel_rank))
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not exported():
            logger.warning("CAPS metrics stay in this process's prometheus registry, which no /metrics endpoint "
                           "of vLLM's serves: PROMETHEUS_MULTIPROC_DIR is not set. `vllm serve` sets it up by "
                           "itself; with another launcher run `export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d)` "
                           "before it starts vLLM (an empty folder, one per server)")
        elif os.environ.get(OWNED_ENV) == folder:
            logger.info("CAPS metrics: on vllm serve's /metrics via PROMETHEUS_MULTIPROC_DIR=%s (made for this "
                        "server, removed at exit)", folder)
        else:
            logger.info("CAPS metrics: on /metrics via your PROMETHEUS_MULTIPROC_DIR=%s (files of finished "
                        "processes were removed at startup)", folder)
        if pred is None:
            return RoutingObserver(metrics, None, 1, 1, 1)
        return RoutingObserver(metrics, lambda ids: pred.vector(ids), pred.layers, pred.num_experts, pred.top_k)

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

    def _caps_shared_load(self, head: list[Waiting], running: _RunningPass | None) -> np.ndarray:
        """The running batch's load over the decode steps the head's requests would share with it
        (caps_vllm.running_load): the running set brought up to date, each request weighted by
        how much of the median candidate's ``max_tokens`` it will still be running. Without a
        pass over the running batch (many running), the steps left come from the rows' kept end
        steps, refreshed when a request starts plain decode (:meth:`_caps_capacity`)."""
        run, reqs, now = self.caps_running, self.running, self._caps_step
        keys = [r.request_id for r in reqs] if running is None else running.keys
        rows = run.sync(keys, lambda i: self._caps_vector(reqs[i]), lambda i: _steps_left(reqs[i]), now)
        left = run.steps_left(rows, now) if running is None else running.remaining
        horizon = statistics.median([w.item.max_tokens for w in head]) if head else 0.0
        return run.shared(rows, left, float(horizon))

    def _caps_capacity(self, free: int) -> tuple[Capacity, _RunningPass | None]:
        """What vLLM will have left for waiting requests this step, as its ``schedule()`` spends it:
        the token budget after every running request's next tokens (decode, prefill chunks,
        capped by long_prefill_token_threshold) and the free KV blocks after those the running
        requests' next tokens open (prefix-cache hits and the watermark are not counted: an
        estimate; vLLM enforces the real budgets).

        A request in plain decode schedules exactly one token a step until it leaves the running
        batch, so with many running only the few that are not (``_caps_busy``: admitted or
        resumed, prefilling, chunked) are read: the token budget left is then the same as a pass
        over all of them gives, and the KV estimate counts a new block for every decoding request
        (at most one each), an under-estimate; :meth:`_caps_reorder` falls back to the full pass
        whenever that could change what FCFS admits. None for the pass: not walked."""
        if len(self.running) <= _WALK_ALL or getattr(self, "num_spec_tokens", 0):
            return self._caps_capacity_walk(free)
        tokens, bs = self.max_num_scheduled_tokens, self.block_size
        thr = self.scheduler_config.long_prefill_token_threshold
        busy, opened, counted = self._caps_busy, 0, 0
        for rid, r in list(busy.items()):
            if r.status != RequestStatus.RUNNING:
                del busy[rid]  # finished or preempted (a resumed request comes back through schedule())
                continue
            c = r.num_computed_tokens
            n = r.num_tokens_with_spec + r.num_output_placeholders - c
            if n == 1:
                del busy[rid]  # plain decode from now on: counted below with the others
                self.caps_running.refresh(rid, _steps_left(r), self._caps_step)
                continue
            counted += 1
            n = thr if 0 < thr < n else n
            if n > 0:
                tokens -= n
                opened += (c + n - 1) // bs - (c - 1) // bs
        decoding = len(self.running) - counted
        return self._caps_left(free, max(tokens - decoding, 0), opened + decoding), None

    def _caps_capacity_walk(self, free: int) -> tuple[Capacity, _RunningPass]:
        """:meth:`_caps_capacity` by one pass over every running request, which also keeps what
        the shared load needs of each (so a choosing step walks the running batch once)."""
        tokens, bs = self.max_num_scheduled_tokens, self.block_size
        thr = self.scheduler_config.long_prefill_token_threshold
        opened = 0  # KV blocks the running requests' next tokens start
        keys: list[str] = []
        remaining: list[int] = []
        for r in self.running:
            c = r.num_computed_tokens
            n = r.num_tokens_with_spec + r.num_output_placeholders - c
            if 0 < thr < n:
                n = thr
            if n > tokens:
                n = tokens
            if n > 0:
                tokens -= n
                opened += (c + n - 1) // bs - (c - 1) // bs  # ceil((c + n) / bs) - ceil(c / bs)
            keys.append(r.request_id)
            remaining.append(_steps_left(r))
        return self._caps_left(free, tokens, opened), _RunningPass(keys, remaining)

    def _caps_left(self, free: int, tokens: int, opened: int) -> Capacity:
        """The capacity left: ``tokens`` of the budget, the free KV blocks less ``opened``."""
        bs = self.block_size
        kv = (self.kv_cache_manager.block_pool.get_num_free_blocks() - opened) * bs
        return Capacity(free, tokens, max(kv, 0), self.scheduler_config.enable_chunked_prefill, bs)

    def _caps_need(self, r: Request) -> int:
        """A waiting request's tokens this step as vLLM caps them (long_prefill_token_threshold)."""
        n, thr = r.num_tokens - r.num_computed_tokens, self.scheduler_config.long_prefill_token_threshold
        return thr if 0 < thr < n else n

    def _caps_reorder(self) -> None:
        waiting = self.waiting
        max_active = getattr(self, "max_num_active_reqs", self.max_num_running_reqs)
        free = max_active - len(self.running) - getattr(self, "num_waiting_for_streaming_input", 0) \
            - len(getattr(self, "kv_holding_waiting", ()))
        if free <= 0 or len(waiting) < self.caps_config.min_batch_trigger:
            self.caps_planner.engaged(len(waiting), free)  # counts the FCFS-fallback steps
            return  # checked before any per-step work: most steps stop here
        cap, running = self._caps_capacity(free)
        admits = fcfs_admissions((self._caps_need(r) for r in waiting), cap)
        if running is None and admits != fcfs_admissions((self._caps_need(r) for r in waiting),
                                                         dataclasses.replace(cap, kv_tokens=None)):
            cap, running = self._caps_capacity_walk(free)  # the KV under-estimate binds: count exactly
            admits = fcfs_admissions((self._caps_need(r) for r in waiting), cap)
        if not self.caps_planner.engaged(len(waiting), admits):
            return
        plans = self.caps_planner.stats.plans
        # Only the head can move (see AdmissionPlanner.plan): O(admits + window), not O(queue).
        head = [Waiting(r, r.request_id, r.arrival_time, r.status == RequestStatus.PREEMPTED, r.priority,
                        self._caps_need(r))
                for r in itertools.islice(waiting, admits + self.caps_config.window_size)]
        order = self.caps_planner.plan(head, self._caps_vector, self._caps_shared_load(head, running), cap,
                                       self.caps_clock(), by_priority=self.policy == SchedulingPolicy.PRIORITY,
                                       queue_len=len(waiting), admits=admits)
        if order is not None:
            assert len(order) == len(head), "CAPS must neither drop nor duplicate a request"
            new = order + list(itertools.islice(waiting, len(head), None))  # built before the queue is touched
            waiting.clear()
            waiting.extend(new)
        if self.caps_planner.stats.plans > plans:
            self._caps_ranked_step = self.caps_planner.stats.ranked

    def schedule(self, *args, **kwargs):
        if not self._caps_on:
            return super().schedule(*args, **kwargs)
        st = self.caps_planner.stats
        before = (st.ranked, st.bypassed, self.caps_counters["predictor_fallback"], st.engaged, st.reordered, st.pinned,
                  st.kept_fcfs, st.guard_fallback)
        self._caps_ranked_step = None
        self._caps_step += 1 + getattr(self, "num_spec_tokens", 0)  # the most tokens a request takes a step
        log = self.caps_step_log
        if log is not None:
            log.begin()
        if self.caps_predictor is not None and self.waiting:
            t0 = time.perf_counter()
            try:
                self._caps_reorder()
            except Exception:  # never let the policy take the engine down
                self.caps_counters["errors"] += 1
                if self.caps_observer is not None:
                    self.caps_observer.metrics.inc("vllm:caps_errors")
                self._caps_warn_once("error", "CAPS admission failed; this step stays FCFS (further errors are only "
                                     "counted)", log=logger.exception)
            self.caps_seconds += time.perf_counter() - t0
        out = super().schedule(*args, **kwargs)
        if self.caps_predictor is not None:  # what _caps_reorder's budget estimate reads
            t0 = time.perf_counter()
            self._caps_guard(self._caps_track_admitted, out)
            self.caps_seconds += time.perf_counter() - t0
        if self.caps_observer is not None:
            self._caps_guard(self._caps_observe_schedule, out, before)
        if log is not None:
            self._caps_guard(log.scheduled, out, self.requests)
        return out

    def _caps_track_admitted(self, out) -> None:
        """Requests that joined the running batch this step (new or resumed) are not yet in plain
        decode: _caps_capacity reads them until they are. Where it does not run (no queue), the
        ones that stopped running are dropped once they could outnumber the running batch, so
        the dict stays within twice its size at an amortised O(1) an admission."""
        busy, reqs = self._caps_busy, self.requests
        for rid in itertools.chain((r.req_id for r in out.scheduled_new_reqs), out.scheduled_cached_reqs.resumed_req_ids):
            r = reqs.get(rid)
            if r is not None:
                busy[rid] = r
        if len(busy) > 2 * len(self.running) + _WALK_ALL:
            for rid in [rid for rid, r in busy.items() if r.status != RequestStatus.RUNNING]:
                del busy[rid]

    def update_from_output(self, scheduler_output, model_runner_output):
        if not self._caps_on:
            return super().update_from_output(scheduler_output, model_runner_output)
        record = getattr(model_runner_output, "caps_routing", None)
        aux = getattr(model_runner_output, "aux_output_connector_output", None)
        if record is None and aux and self.caps_predictor is not None:
            try:
                record = self._caps_record_from_rows(aux)
            except Exception:  # rows of a shape CAPS does not know: metrics and learning skip the step
                self.caps_counters["errors"] += 1
                self._caps_warn_once("rows", "CAPS could not read vLLM's routed-experts rows; routing metrics and "
                                     "learning skip such steps (further errors are only counted)",
                                     log=logger.exception)
        if record is not None:  # before vLLM frees the requests that finished
            if self.caps_observer is not None:  # scored before the table learns these rows
                self._caps_guard(self._caps_observe_output, record)
            if self.caps_learner is not None:
                self._caps_guard(self._caps_learn, record)
            if self.caps_planner.guard is not None:
                self._caps_guard(self._caps_judge, record)
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        if self.caps_observer is not None and self.caps_config.capture_decode:
            done = [o.request_id for eco in outputs.values() for o in eco.outputs if o.finish_reason is not None]
            self._caps_guard(self.caps_observer.on_finished, done)
        if self.caps_step_log is not None:
            self._caps_guard(self.caps_step_log.updated, outputs, self.has_unfinished_requests(),
                             None if record is None else record.layer_counts)
        return outputs

    def _caps_learn(self, record: RoutingRecord) -> None:
        reqs = self.requests

        def prompt_of(rid):
            r = reqs.get(rid)
            return None if r is None or r.mm_features else r.prompt_token_ids

        recall = self.caps_learner.observe(record, prompt_of)
        if self.caps_observer is not None and recall.picks:
            self.caps_observer.on_learning(recall)

    def _caps_judge(self, record: RoutingRecord) -> None:
        """The captured prompts the live guard waits for (caps_vllm.guard)."""
        guard, reqs = self.caps_planner.guard, self.requests
        for rid, counts in record.prompt_counts.items():
            if guard.wants(rid):
                r = reqs.get(rid)
                gains = guard.routed(rid, counts, r is not None and r.num_computed_tokens >= r.num_prompt_tokens)
                if self.caps_observer is not None:
                    for g in gains:
                        self.caps_observer.metrics.observe("vllm:caps_guard_realized_gain_ms", g)

    def _caps_guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # metrics must never take the engine down either
            self.caps_counters["errors"] += 1
            self._caps_warn_once("metrics", "CAPS metrics or step log failed; further errors are only counted",
                                 log=logger.exception)

    def _caps_observe_schedule(self, out, before) -> None:
        st, obs = self.caps_planner.stats, self.caps_observer
        ranked = None if self._caps_ranked_step is None else st.ranked - before[0]
        obs.on_admission(len(out.scheduled_new_reqs), ranked, st.bypassed - before[1],
                         self.caps_counters["predictor_fallback"] - before[2],
                         st.last_selection_s if ranked is not None else None,
                         st.engaged - before[3], st.reordered - before[4], st.pinned - before[5],
                         st.kept_fcfs - before[6], st.guard_fallback - before[7])
        reqs, predicted = self.requests, self.caps_predictor is not None
        obs.on_schedule(out.num_scheduled_tokens,
                        lambda rid: self._caps_vector(reqs[rid]) if predicted and rid in reqs else None)

    def _caps_observe_output(self, record: RoutingRecord) -> None:
        reqs = self.requests

        def prompt_of(rid):
            r = reqs.get(rid)
            if r is None or r.prompt_token_ids is None or r.mm_features:
                return None  # gone, or a prompt whose routed tokens are not its token ids
            return r.prompt_token_ids, r.num_computed_tokens >= r.num_prompt_tokens

        self.caps_observer.on_output(record, prompt_of)

    def _caps_record_from_rows(self, aux) -> RoutingRecord:
        """GPU path: vLLM's routed-experts rows (``--enable-return-routed-experts``) as a record."""
        pred = self.caps_predictor
        layers = list(pred.moe_layers)
        total = np.zeros((len(layers), pred.num_experts), dtype=np.int64)
        rec = RoutingRecord(tuple(layers), total, 0)
        for rid, out in aux.items():
            rows = np.asarray(out.rows)
            if rows.ndim != 3 or not len(rows):
                continue  # no routing for this request in this step (e.g. a prompt-end offset)
            rows = rows[:, layers]
            total += counts_from_rows(rows, pred.num_experts)
            rec.num_tokens += len(rows)
            r = self.requests.get(rid)
            in_prompt = 0 if r is None else max(0, min(len(rows), r.num_prompt_tokens - out.token_start))
            if in_prompt:
                rec.prompt_counts[rid] = counts_from_rows(rows[:in_prompt], pred.num_experts)
                rec.prompt_start[rid] = out.token_start
                if self.caps_learner is not None:
                    rec.prompt_rows[rid] = rows[:in_prompt]
            if self.caps_config.capture_decode and len(rows) > in_prompt:
                rec.decode_counts[rid] = counts_from_rows(rows[in_prompt:], pred.num_experts)
        return rec


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
