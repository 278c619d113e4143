"""The one CAPS object a vLLM scheduler carries: all of CAPS's state and its per-step work.

The scheduler subclass (caps_vllm.scheduler) only calls in: :meth:`Caps.before_schedule` reorders
the waiting queue, vLLM's ``schedule()`` admits from its front under every budget,
:meth:`Caps.after_schedule` and :meth:`Caps.on_output` hear what happened. Data flows one way:
vLLM's state (read through caps_vllm.vllm_state) -> the planner's decision -> vLLM's queue;
routing -> observer, learner and guard.

Everything here runs on the EngineCore busy-loop thread (the running-load update, prediction
of the requests that enter the window not predicted on arrival, and the selection), or, with
``plan_ahead``, on a worker thread while the model runs (caps_vllm.ahead): then ``schedule()``
only applies the plan the worker made for it from the state the step before left. Nothing runs
while fewer than ``min_batch_trigger`` requests wait. Any error is logged once and that step is
left in FCFS order: CAPS never crashes the engine.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import statistics
import time
from collections import Counter
from typing import NamedTuple

import numpy as np
from vllm.v1.request import Request

from caps_vllm import vllm_state as vs
from caps_vllm.admission import AdmissionPlanner, AdmissionStats, Capacity, Waiting, fcfs_admissions
from caps_vllm.ahead import Worker
from caps_vllm.blas import limit_threads
from caps_vllm.config import CapsConfig
from caps_vllm.guard import FcfsGuard
from caps_vllm.learner import OnlineLearner
from caps_vllm.logs import OWNED_ENV, WarnOnce
from caps_vllm.predictor import ExpertPredictor, PredictorUnavailable
from caps_vllm.routing import RoutingRecord, counts_from_rows
from caps_vllm.running_load import RunningLoad
from caps_vllm.step_log import StepLog

logger = logging.getLogger("caps_vllm.scheduler")
_NO_VECTOR = object()


class AheadJob(NamedTuple):
    """What the busy loop hands the plan-ahead worker right after ``schedule()`` of step ``step``."""

    out: object  # the SchedulerOutput
    head: list[Request]  # the waiting queue's first requests, as they are now
    queue_len: int
    free: int  # sequence slots free after this step's admissions
    running: list[Request]  # the batch just scheduled
    step: int  # the step the plan is for
    now: float


class PromptInfo(NamedTuple):
    """What the routing's consumers read of a request: its routed prompt ids (None: prompt
    embeddings, multimodal), whether its prompt is all computed, its prompt's length."""

    ids: list[int] | None
    done: bool
    length: int


class RoutingJob(NamedTuple):
    """A step's routing for the plan-ahead worker, with what it needs of the requests, read on
    the busy loop before vLLM frees the ones that finished."""

    record: RoutingRecord | None
    aux: dict | None  # vLLM's routed-experts rows, where no record was attached
    prompts: dict[str, PromptInfo | None]


def _timed(hook):
    """A hook whose wall time counts into ``Caps.seconds`` (CAPS's own time on the engine's busy loop)."""

    @functools.wraps(hook)
    def timed(self, *args):
        t0 = time.perf_counter()
        try:
            return hook(self, *args)
        finally:
            self.seconds += time.perf_counter() - t0

    return timed


class Caps:
    """CAPS's state for one vLLM scheduler (``sched``), built when the scheduler is."""

    #: plan-ahead jobs run as they are submitted, not on a thread (the twin's virtual clock)
    inline_ahead = False

    def __init__(self, sched) -> None:
        self.sched = sched
        vllm_config = sched.vllm_config
        raw = (vllm_config.additional_config or {}).get("caps")
        self.config = CapsConfig.from_dict(raw)  # an invalid value stops startup here
        if self.config.blas_threads is not None:
            lib = limit_threads(self.config.blas_threads)
            logger.info(
                "CAPS: numpy's BLAS on %s thread(s) in this process (%s)",
                self.config.blas_threads,
                lib or "no OpenBLAS found: left as it is",
            )
        self.counters: Counter[str] = Counter(predicted_on_arrival=0)  # (that one written by vLLM's input thread)
        self.warn_once = WarnOnce(logger)
        self.predictor = self._load_predictor(vllm_config) if self.config.predictor else None
        self.learner = self._make_learner()
        d = self.predictor.d if self.predictor is not None else 1
        self.planner = AdmissionPlanner(self.config, d, self._deployment(vllm_config))
        self.planner.guard = self._make_guard()
        self.running = RunningLoad(d, sched.max_num_running_reqs)
        self.busy: dict[str, Request] = {}  # running requests not (yet) known to be in plain decode
        self.unfilled: dict[str, Request] = {}  # joined the running rows; vector and end step not read yet
        self.observer = self._make_observer(vllm_config) if self.config.metrics else None
        self.step = 0  # schedule() calls, in tokens a running request may take (the rows' end steps)
        self.seconds = 0.0  # wall time of CAPS's own work around schedule() and update_from_output(), summed
        # Waiting times are measured on the clock vLLM stamps arrival_time with; the twin
        # (sim/twin.py) replaces it with its virtual clock.
        self.clock = time.time
        self.step_log = self._make_step_log(vllm_config)
        self._before: tuple[AdmissionStats, int] = (AdmissionStats(), 0)
        self.worker = self._make_worker()
        # plan ahead: (for step, head, its new order or None: FCFS) the worker made; the step of
        # the last job submitted; the last step whose plan was in time; (step, the stats' change,
        # the predictor fallbacks) of the last plan made, for that step's metrics
        self.plan: tuple[int, list[Request], list[Request] | None] | None = None
        self.expected = self.used = 0
        self._made: tuple[int, AdmissionStats, int] | None = None

    # --- construction -------------------------------------------------------------------------

    def _make_worker(self) -> Worker | None:
        on = self.config.plan_ahead
        if on is None:  # auto: where the model runs on an accelerator and the busy loop waits for it
            from vllm.platforms import current_platform

            on = not current_platform.is_cpu()
        if not on or self.predictor is None:
            return None
        logger.info("CAPS plans each step's admissions ahead, on a worker thread while the model runs")
        return Worker(self._run_job, inline=self.inline_ahead)

    def _make_step_log(self, vllm_config) -> StepLog | None:
        path = self.config.step_log
        if not path:
            return None
        pc = vllm_config.parallel_config
        if pc.data_parallel_size > 1:
            path = f"{path}.{pc.data_parallel_rank}"
        logger.info("CAPS step log: %s", path)
        return StepLog(path)

    def _load_predictor(self, vllm_config) -> ExpertPredictor | None:
        mc = vllm_config.model_config
        try:
            pred = ExpertPredictor.from_model(mc.model, getattr(mc, "revision", None), self.config.cache_dir)
        except PredictorUnavailable as exc:
            logger.warning(
                "CAPS cannot predict expert loads for %s (%s): admission stays FCFS. CAPS is for "
                "Mixture-of-Experts models whose router weights are on local disk; for a dense model "
                "leave out --scheduler-cls and vLLM's own scheduler does the same with less work",
                mc.model,
                exc,
            )
            return None
        vocab = mc.get_vocab_size() if hasattr(mc, "get_vocab_size") else pred.vocab
        if vocab != pred.vocab:
            logger.warning("CAPS router table covers %d token ids, the model %d: others are skipped", pred.vocab, vocab)
        return pred

    def _make_learner(self) -> OnlineLearner | None:
        cfg, pred = self.config, self.predictor
        if not (cfg.learn and cfg.capture) or not isinstance(pred, ExpertPredictor):
            return None
        return OnlineLearner(pred, cfg.learn_max_tokens, cfg.learn_half_life_tokens)

    def _make_guard(self) -> FcfsGuard | None:
        """The live guard, where it can judge: routing captured, a priced strategy, per-token vectors."""
        cfg, pred, strategy = self.config, self.predictor, self.planner.strategy
        if not (
            cfg.capture and cfg.guard_window and cfg.vectors == "per_token" and hasattr(strategy, "cost")
        ) or not isinstance(pred, ExpertPredictor):
            return None
        return FcfsGuard(strategy.cost, pred.layers * pred.top_k, cfg.guard_window)

    def _deployment(self, vllm_config) -> dict:
        """Experts per layer and vLLM's expert-parallel layout, for deployment-aware strategies."""
        if self.predictor is None:
            return {}
        ranks, placement, eplb = vs.expert_parallel(vllm_config)
        if eplb:
            logger.warning(
                "CAPS: EPLB moves experts while serving; deployment-aware strategies assume vLLM's "
                "initial %s placement",
                placement,
            )
        return {"experts": self.predictor.num_experts, "ranks": ranks, "placement": placement}

    def _make_observer(self, vllm_config):
        from caps_vllm.metrics import CapsMetrics, exported
        from caps_vllm.observer import RoutingObserver

        mc, pred = vllm_config.model_config, self.predictor
        metrics = CapsMetrics(str(mc.served_model_name), str(vllm_config.parallel_config.data_parallel_rank))
        folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if not exported():
            logger.warning(
                "CAPS metrics stay in this process's prometheus registry, which no /metrics endpoint "
                "of vLLM's serves: PROMETHEUS_MULTIPROC_DIR is not set. `vllm serve` sets it up by "
                "itself; with another launcher run `export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d)` "
                "before it starts vLLM (an empty folder, one per server)"
            )
        elif os.environ.get(OWNED_ENV) == folder:
            logger.info(
                "CAPS metrics: on vllm serve's /metrics via PROMETHEUS_MULTIPROC_DIR=%s (made for this "
                "server, removed at exit)",
                folder,
            )
        else:
            logger.info(
                "CAPS metrics: on /metrics via your PROMETHEUS_MULTIPROC_DIR=%s (files of finished "
                "processes were removed at startup)",
                folder,
            )
        if pred is None:
            return RoutingObserver(metrics, None, 1, 1, 1)
        return RoutingObserver(
            metrics,
            pred.vector,
            pred.layers,
            pred.num_experts,
            pred.top_k,
            per_token=self.config.vectors == "per_token",
        )

    # --- what the scheduler calls -------------------------------------------------------------

    def arrived(self, request: Request) -> None:
        """A request as vLLM prepares it, before the busy loop sees it (vLLM's input thread where
        an engine serves; caps_vllm.plugin): its load is predicted here, so schedule() finds it
        done. Only this thread writes ``request.caps_vector`` then (the request is nobody else's
        yet) and the ``predicted_on_arrival`` count (created up front: the dict never grows
        while the busy loop reads it). Never raises: a request left unpredicted (no known token,
        an error) is predicted, and counted, when a choice needs it."""
        if self.predictor is None:
            return
        try:
            ids = vs.prompt_ids(request)
            v = None if ids is None else self.predictor.vector(ids, per_token=self.config.vectors == "per_token")
            if v is not None:
                request.caps_vector = v
                self.counters["predicted_on_arrival"] += 1
                if self.observer is not None:  # (prometheus_client's counters lock)
                    self.observer.metrics.inc("vllm:caps_predicted_on_arrival_requests")
        except Exception:
            self.warn_once(
                "arrival",
                "CAPS could not predict a request as it arrived; it is predicted when needed",
                log=logger.exception,
            )

    def added(self, request: Request) -> None:
        if self.step_log is not None:
            self.step_log.added(request)

    def aborted(self, requests: list[Request]) -> None:
        if self.observer is not None:
            self.later(functools.partial(self.observer.on_finished, [r.request_id for r in requests], score=False))
        if self.step_log is not None:
            self.step_log.dropped(r.request_id for r in requests)

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.observer is not None:
            self.guarded(self.observer.flush)
        if self.learner is not None:
            self.learner.close()

    @_timed
    def before_schedule(self, holds_prefills: bool) -> None:
        """Reorder the waiting queue for this step (``holds_prefills``: vLLM admits nothing new)."""
        self.step += 1 + vs.spec_tokens(self.sched)  # the most tokens a request takes a step
        if self.step_log is not None:
            self.step_log.begin()
        if self.worker is not None:
            self.apply_plan(holds_prefills)
            return
        if self.observer is not None:  # what this step does is told the observer as the change from here
            self._before = (dataclasses.replace(self.planner.stats), self.counters["predictor_fallback"])
        if self.predictor is not None and self.sched.waiting and not holds_prefills:
            try:
                self.reorder()
            except Exception:  # never let the policy take the engine down
                self._count("errors", "vllm:caps_errors")
                self.warn_once(
                    "error",
                    "CAPS admission failed; this step stays FCFS (further errors are only counted)",
                    log=logger.exception,
                )

    def apply_plan(self, holds_prefills: bool) -> None:
        """Put the worker's plan for this step into vLLM's queue, if the queue's head is still the
        one it was planned from (else, or without a plan in time, this step stays FCFS: counted,
        ``plans_dropped`` and ``plans_late``)."""
        plan, self.plan = self.plan, None
        if plan is None or plan[0] != self.step:  # (one for an earlier step: that step counted it late)
            if self.expected == self.step:
                self._count("plans_late", "vllm:caps_plan_ahead_late_steps")
            return
        _, head, order = plan
        if order is not None:
            if holds_prefills or not vs.head_is(self.sched, head):
                self._count("plans_dropped", "vllm:caps_plan_ahead_dropped_steps")
                return
            vs.reorder_head(self.sched, order)
        self.counters["plans_applied"] += 1  # (a plan to keep FCFS's order too)
        self.used = self.step

    def _count(self, counter: str, metric: str) -> None:
        self.counters[counter] += 1
        if self.observer is not None:
            self.observer.metrics.inc(metric)

    @_timed
    def after_schedule(self, out) -> None:
        s = self.sched
        if self.worker is not None:
            free = vs.free_slots(s)
            head = list(
                itertools.islice(s.waiting, free + len(s.running) + self.config.window_size)
            )  # the most a plan reads
            job = AheadJob(
                out, head, len(s.waiting), free, list(s.running), self.step + 1 + vs.spec_tokens(s), self.clock()
            )
            self.expected = job.step
            self.hand_over(job)
        else:
            if self.predictor is not None:  # what reorder's budget estimate reads
                self.guarded(self.track_admitted, out)
            if self.observer is not None:
                d = self.planner.stats.since(self._before[0])
                self.guarded(self._observe_schedule, out, d, self.counters["predictor_fallback"] - self._before[1])
        if self.step_log is not None:
            self.guarded(self.step_log.scheduled, out, self.sched.requests)

    @_timed
    def on_output(self, model_runner_output) -> RoutingRecord | None:
        """A step's model output, before vLLM frees the requests that finished: its routing to
        the observer (scored before the table learns these rows), the learner and the guard;
        planning ahead, handed to the worker with what it needs of the requests."""
        record = getattr(model_runner_output, "caps_routing", None)
        aux = getattr(model_runner_output, "aux_output_connector_output", None)
        if record is None and not (aux and self.predictor is not None):
            return None
        if self.worker is None:
            return self.routing(record, aux, self.prompt_info)
        if record is None:
            rids = aux.keys()
        else:
            rids = itertools.chain(record.prompt_counts, record.prompt_rows, record.decode_counts)
        self.hand_over(RoutingJob(record, aux, {rid: self.prompt_info(rid) for rid in rids}))
        return record

    def prompt_info(self, rid: str) -> PromptInfo | None:
        r = self.sched.requests.get(rid)
        return None if r is None else PromptInfo(vs.routed_prompt(r), vs.prompt_done(r), r.num_prompt_tokens)

    def routing(self, record: RoutingRecord | None, aux, info) -> RoutingRecord | None:
        """A step's routing (``record``, or vLLM's rows ``aux`` made into one) to the observer,
        the learner and the guard; ``info(rid)``: the request's :class:`PromptInfo`."""
        if record is None:
            try:
                record = self.record_from_rows(aux, info)
            except Exception:  # rows of a shape CAPS does not know: metrics and learning skip the step
                self.counters["errors"] += 1
                self.warn_once(
                    "rows",
                    "CAPS could not read vLLM's routed-experts rows; routing metrics and "
                    "learning skip such steps (further errors are only counted)",
                    log=logger.exception,
                )
        if record is not None:
            if self.observer is not None:
                self.guarded(self._observe_output, record, info)
            if self.learner is not None:
                self.guarded(self._learn, record, info)
            if self.planner.guard is not None:
                self.guarded(self.judge, record, info)
        return record

    @_timed
    def after_output(self, outputs, record: RoutingRecord | None) -> None:
        obs = self.observer
        if obs is not None and self.config.capture_decode:
            self.later(lambda: obs.on_finished(vs.finished_ids(outputs)))
        if obs is None and self.step_log is None:
            return
        busy = self.sched.has_unfinished_requests()
        if obs is not None and not busy:
            self.later(obs.flush)  # the batched figures are all out whenever the engine idles
        if self.step_log is not None:
            self.guarded(self.step_log.updated, outputs, busy, None if record is None else record.layer_counts)

    def hand_over(self, job) -> None:
        """Queue ``job`` for the worker; one it refuses (far behind the engine) is dropped, counted."""
        if not self.worker.submit(job):
            self.counters["worker_refused"] += 1
            self.warn_once(
                "refused",
                "CAPS's plan-ahead worker is %d jobs behind the engine: its jobs are dropped until it "
                "catches up (metrics and plans of those steps are lost; counted)",
                self.worker.limit,
            )

    def later(self, fn) -> None:
        """Run ``fn()`` (guarded) now, or planning ahead on the worker, after what it has queued."""
        if self.worker is None:
            self.guarded(fn)
        else:
            self.hand_over(functools.partial(self.guarded, fn))

    def guarded(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception:  # metrics must never take the engine down either
            self.counters["errors"] += 1
            self.warn_once(
                "metrics", "CAPS metrics or step log failed; further errors are only counted", log=logger.exception
            )

    # --- admission ----------------------------------------------------------------------------

    def vector(self, request: Request) -> np.ndarray | None:
        """The request's predicted load, computed once and kept on the request."""
        v = getattr(request, "caps_vector", _NO_VECTOR)
        if v is _NO_VECTOR:
            self.predict([request])
            v = request.caps_vector
        return v

    def predict(self, requests: list[Request]) -> None:
        """Predict the loads of those of ``requests`` not predicted yet, in one counting pass
        (a step's newcomers to the window at once), and keep each on its request."""
        new = [r for r in requests if not hasattr(r, "caps_vector")]
        if not new:
            return
        ids = [vs.prompt_ids(r) for r in new]
        known = [i for i, p in enumerate(ids) if p is not None]
        vecs = self.predictor.vectors([ids[i] for i in known], per_token=self.config.vectors == "per_token")
        for r in new:
            r.caps_vector = None
        for i, v in zip(known, vecs):
            new[i].caps_vector = v
        for r, p in zip(new, ids):
            if r.caps_vector is None:
                self._no_vector("prompt_embeds" if p is None else "no_known_tokens")

    def _no_vector(self, reason: str) -> None:
        self.counters["predictor_fallback"] += 1
        self.counters[f"predictor_fallback_{reason}"] += 1
        self.warn_once(
            reason,
            "CAPS: a request has no predictable prompt tokens (%s); it keeps its FCFS place (counted, warned once "
            "per reason)",
            reason,
        )

    def shared_load(self, head: list[Waiting], running: vs.RunningPass | None) -> np.ndarray:
        """The running batch's load over the decode steps the head's requests would share with it
        (caps_vllm.running_load): the running set brought up to date, each request weighted by
        how much of the median candidate's ``max_tokens`` it will still be running. Without a
        pass over the running batch (many running), the rows follow the batch's changes (joined
        in :meth:`track_admitted`, finished since the last step dropped here) and the steps left
        come from their kept end steps, refreshed when a request starts plain decode
        (:meth:`capacity`); a pass over every running request only when the count disagrees."""
        run, sched, now = self.running, self.sched, self.step
        for rid in vs.finished_since_schedule(sched):
            run.remove(rid)
            self.unfilled.pop(rid, None)
        for rid, r in self.unfilled.items():
            if rid in run:
                run.fill(rid, self.vector(r))
                run.refresh(rid, vs.steps_left(r), now)
        self.unfilled.clear()
        reqs = sched.running
        if running is None and len(run) == len(reqs):
            rows = run.rows()
            left = run.steps_left(rows, now)
        else:
            if running is not None:
                reqs = running.requests
            keys = vs.running_keys(sched) if running is None else running.keys
            rows = run.sync(keys, lambda i: self.vector(reqs[i]), lambda i: vs.steps_left(reqs[i]), now)
            left = run.steps_left(rows, now) if running is None else running.remaining
            self.counters["running_load_syncs"] += running is None
        horizon = statistics.median([w.item.max_tokens for w in head]) if head else 0.0
        return run.shared(rows, left, float(horizon))

    def capacity(self, free: int) -> tuple[Capacity, vs.RunningPass | None]:
        """What vLLM will have left for waiting requests this step (caps_vllm.vllm_state): with
        many running, from the few not in plain decode (the KV estimate then under-counts:
        :meth:`reorder` falls back to the full pass whenever that could change what FCFS admits).
        None for the pass: not walked."""
        if vs.walks_all(self.sched):
            return vs.capacity_walk(self.sched, free)
        refresh = self.running.refresh
        return vs.capacity_busy(
            self.sched, free, self.busy, lambda rid, r: refresh(rid, vs.steps_left(r), self.step)
        ), None

    def reorder(self) -> None:
        s = self.sched
        order = self.decide(None, len(s.waiting), vs.free_slots(s), self.capacity, self.clock())
        if order is not None:
            vs.reorder_head(s, order)

    def decide(self, queue, queue_len: int, free: int, capacity, now: float) -> list[Request] | None:
        """The new order of the head of ``queue`` (the waiting requests in order, None: vLLM's
        queue; ``queue_len`` of them), or None to keep it; ``free`` slots, ``capacity(free)`` the
        budget estimate (:meth:`capacity`, or the next step's for a plan made ahead)."""
        s = self.sched
        if free <= 0 or queue_len < self.config.min_batch_trigger:
            self.planner.engaged(queue_len, free)  # counts the FCFS-fallback steps
            return None  # checked before any per-step work: most steps stop here
        cap, running = capacity(free)
        # Only the head can move (see AdmissionPlanner.plan): O(admits + window), not O(queue);
        # each request's tokens are read once for every estimate (vs.QueueHead).
        reader = vs.QueueHead(s, queue)
        admits = fcfs_admissions(reader.stream(), cap)
        if running is None and admits != fcfs_admissions(reader.stream(), dataclasses.replace(cap, kv_tokens=None)):
            cap, running = vs.capacity_walk(s, free)  # the KV under-estimate binds: count exactly
            admits = fcfs_admissions(reader.stream(), cap)
        if not self.planner.engaged(queue_len, admits):
            return None
        head = reader.waiting(admits + self.config.window_size)
        self.predict([w.item for w in head])
        order = self.planner.plan(
            head,
            self.vector,
            self.shared_load(head, running),
            cap,
            now,
            by_priority=vs.by_priority(s),
            queue_len=queue_len,
            admits=admits,
        )
        if order is not None:
            assert len(order) == len(head), "CAPS must neither drop nor duplicate a request"
        return order

    def _run_job(self, job, stale: bool) -> None:
        """The plan-ahead worker's jobs (caps_vllm.ahead), in the busy loop's order."""
        if isinstance(job, AheadJob):
            self._run_ahead(job, stale)
        elif isinstance(job, RoutingJob):  # (requests not in the step's routing, e.g. a pending prompt's, read now)
            prompts = job.prompts
            self.routing(job.record, job.aux, lambda rid: prompts[rid] if rid in prompts else self.prompt_info(rid))
        else:
            job()

    def _run_ahead(self, job: AheadJob, stale: bool) -> None:
        """The worker's job (caps_vllm.ahead): unless a newer one waits, the plan for step
        ``job.step`` from the state the step just scheduled leaves (the slots the requests ending
        on its token free included), first, as the next ``schedule()`` waits for it; then that
        step's metrics."""
        made, self._made = self._made, None
        before = (dataclasses.replace(self.planner.stats), self.counters["predictor_fallback"])
        if not stale:
            order = None
            try:
                order = self.decide(  # (the slots free next step: at most those of every running request)
                    job.head,
                    job.queue_len,
                    job.free + len(job.running),
                    lambda _: vs.capacity_next(self.sched, job.running, job.free, job.out.num_scheduled_tokens),
                    job.now,
                )
            except Exception:
                self.counters["errors"] += 1
                self.warn_once("error", "CAPS admission failed; this step stays FCFS", log=logger.exception)
            self.plan = (job.step, job.head[: len(order or ())], order)
            fallbacks = self.counters["predictor_fallback"] - before[1]
            self._made = (job.step, self.planner.stats.since(before[0]), fallbacks)
        if self.observer is not None:  # the step just scheduled, with the plan made for it if it was used
            used = made is not None and made[0] == self.used
            d, fallbacks = (made[1], made[2]) if used else (AdmissionStats(), 0)
            self.guarded(self._observe_schedule, job.out, d, fallbacks)

    def track_admitted(self, out) -> None:
        """The running batch's changes this step: finished and preempted requests leave the
        running rows, and requests that joined (new or resumed) get a row, filled when a choice
        needs it (:meth:`shared_load`). The joined are not yet in plain decode: :meth:`capacity`
        reads them until they are. Where it does not run (no queue), the ones that stopped
        running are dropped once they could outnumber the running batch, so the dict stays within
        twice its size at an amortised O(1) an admission."""
        busy, reqs, run, unfilled = self.busy, self.sched.requests, self.running, self.unfilled
        for rid in vs.left_ids(out):  # finished (unless shared_load dropped them already), preempted
            run.remove(rid)
            unfilled.pop(rid, None)
        for rid in vs.admitted_ids(out):
            r = reqs.get(rid)
            if r is not None:
                busy[rid] = r
                if rid not in run:
                    run.add(rid, None)
                    unfilled[rid] = r
        if len(busy) > 2 * len(self.sched.running) + vs.WALK_ALL:
            for rid in [rid for rid, r in busy.items() if not vs.is_running(r)]:
                del busy[rid]

    # --- routing: observer, learner, guard ----------------------------------------------------

    def _learn(self, record: RoutingRecord, info) -> None:
        recall = self.learner.observe(record, lambda rid: None if (p := info(rid)) is None else p.ids)
        if self.observer is not None and recall.picks:
            self.observer.on_learning(recall)

    def judge(self, record: RoutingRecord, info) -> None:
        """The captured prompts the live guard waits for (caps_vllm.guard)."""
        guard = self.planner.guard
        for rid, counts in record.prompt_counts.items():
            if guard.wants(rid):
                p = info(rid)
                gains = guard.routed(rid, counts, p is not None and p.done)
                if self.observer is not None:
                    for g in gains:
                        self.observer.metrics.observe("vllm:caps_guard_realized_gain_ms", g)

    def _observe_schedule(self, out, d: AdmissionStats, fallbacks: int) -> None:
        """A step's admissions, ``d`` what the planner did for it and ``fallbacks`` the requests
        it found unpredictable."""
        ranked = d.ranked if d.plans else None
        self.observer.on_admission(
            len(out.scheduled_new_reqs),
            ranked,
            d.bypassed,
            fallbacks,
            d.last_selection_s if ranked is not None else None,
            d.engaged,
            d.reordered,
            d.pinned,
            d.kept_fcfs,
            d.guard_fallback,
        )
        reqs, predicted = self.sched.requests, self.predictor is not None
        if predicted:  # the joined requests' loads, in one pass for those no choice predicted
            self.predict([r for r in map(reqs.get, vs.admitted_ids(out)) if r is not None])
        # the requests that may take more than one token this step are the busy ones (not with speculation;
        # the worker keeps no busy set: a request may have left vLLM's dict by the time it reads it, hence get)
        exact = not predicted or vs.spec_tokens(self.sched) or self.worker is not None
        self.observer.on_schedule(
            out.num_scheduled_tokens,
            lambda rid: self.vector(r) if predicted and (r := reqs.get(rid)) is not None else None,
            out.total_num_scheduled_tokens,
            (vs.admitted_ids(out), vs.left_ids(out)),
            None if exact else self.busy.keys(),
        )

    def _observe_output(self, record: RoutingRecord, info) -> None:
        def prompt_of(rid):
            p = info(rid)
            return None if p is None or p.ids is None else (p.ids, p.done)

        self.observer.on_output(record, prompt_of)

    def record_from_rows(self, aux, info) -> RoutingRecord:
        """GPU path: vLLM's routed-experts rows (``--enable-return-routed-experts``) as a record."""
        pred = self.predictor
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
            p = info(rid)
            in_prompt = 0 if p is None else max(0, min(len(rows), p.length - out.token_start))
            if in_prompt:
                rec.prompt_counts[rid] = counts_from_rows(rows[:in_prompt], pred.num_experts)
                rec.prompt_start[rid] = out.token_start
                if self.learner is not None:
                    rec.prompt_rows[rid] = rows[:in_prompt]
            if self.config.capture_decode and len(rows) > in_prompt:
                rec.decode_counts[rid] = counts_from_rows(rows[in_prompt:], pred.num_experts)
        return rec
