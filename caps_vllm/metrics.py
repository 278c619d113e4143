"""CAPS's Prometheus metrics, created in the EngineCore process by the scheduler.

They appear on ``vllm serve``'s own ``/metrics`` through prometheus_client's multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR``, which :mod:`caps_vllm.plugin` sets up for ``vllm serve``).
Names follow vLLM's (``vllm:`` prefix, ``_seconds``/``_total`` suffixes, ``model_name`` and
``engine`` labels); the only other labels are ``layer``, bounded by the model's MoE layers, and
``table`` (``learned`` or ``dry_run``), so the number of series never grows with requests. Only
histograms and counters are used: they aggregate correctly across processes in multiprocess
mode without a gauge mode to choose.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram

from caps_vllm.routing import LoadShape

_CV = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0)
_MAX_OVER_MEAN = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0, 64.0)
_DISTINCT = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_FRACTION = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_GAIN_MS = (-1.0, -0.1, -0.01, -0.001, 0.0, 0.001, 0.01, 0.1, 1.0)
_SECONDS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25)

_LABELS = ("model_name", "engine")

#: name -> (kind, help, buckets, extra labels); docs/metrics.md's reference is this table
SPEC: dict[str, tuple[str, str, tuple | None, tuple[str, ...]]] = {
    "vllm:caps_predicted_load_cv": (
        "histogram",
        "Per step: coefficient of variation of the predicted per-expert "
        "load of the scheduled tokens, averaged over MoE layers",
        _CV,
        (),
    ),
    "vllm:caps_actual_load_cv": (
        "histogram",
        "Per step: coefficient of variation of the per-expert load the "
        "routers actually produced, averaged over MoE layers",
        _CV,
        (),
    ),
    "vllm:caps_predicted_load_max_over_mean": (
        "histogram",
        "Per step: max/mean predicted per-expert load, averaged over MoE layers",
        _MAX_OVER_MEAN,
        (),
    ),
    "vllm:caps_actual_load_max_over_mean": (
        "histogram",
        "Per step: max/mean actual per-expert load, averaged over MoE layers",
        _MAX_OVER_MEAN,
        (),
    ),
    "vllm:caps_actual_layer_load_max_over_mean": (
        "histogram",
        "Per step and MoE layer: max/mean actual per-expert load",
        _MAX_OVER_MEAN,
        ("layer",),
    ),
    "vllm:caps_predicted_distinct_experts": (
        "histogram",
        "Per step: experts with a predicted load of at least one token, per MoE layer (mean over layers)",
        _DISTINCT,
        (),
    ),
    "vllm:caps_actual_distinct_experts": (
        "histogram",
        "Per step: experts that received at least one token, per MoE layer (mean over layers)",
        _DISTINCT,
        (),
    ),
    "vllm:caps_predictor_cosine": (
        "histogram",
        "Per request: cosine of the predicted and the actual expert histogram of its prompt tokens",
        _FRACTION,
        (),
    ),
    "vllm:caps_predictor_topk_overlap": (
        "histogram",
        "Per request: share of the actual top-k experts of its prompt "
        "that the predictor also ranked top-k (mean over layers)",
        _FRACTION,
        (),
    ),
    "vllm:caps_predictor_decode_cosine": (
        "histogram",
        "Per finished request (caps.capture_decode): cosine of its "
        "prompt's predicted expert histogram and the actual one of its decode "
        "tokens",
        _FRACTION,
        (),
    ),
    "vllm:caps_predictor_decode_topk_overlap": (
        "histogram",
        "Per finished request (caps.capture_decode): share of "
        "the actual top-k experts of its decode tokens that the prompt's "
        "prediction ranked top-k (mean over layers)",
        _FRACTION,
        (),
    ),
    "vllm:caps_learning_routed_picks": (
        "counter",
        "Routed (prompt token, layer) top-k choices the learning table was scored on before it learned them",
        None,
        (),
    ),
    "vllm:caps_learning_hits": (
        "counter",
        "Of those choices, how many the table predicted (table=learned: the "
        "learning table, table=dry_run: the router dry run alone); top-k recall is "
        "hits / routed picks",
        None,
        ("table",),
    ),
    "vllm:caps_selection_seconds": (
        "histogram",
        "Per ranked step: time CAPS took to order the waiting queue",
        _SECONDS,
        (),
    ),
    "vllm:caps_steps": ("counter", "Scheduler steps that scheduled tokens", None, ()),
    "vllm:caps_scheduled_tokens": ("counter", "Tokens scheduled by vLLM", None, ()),
    "vllm:caps_routed_tokens": ("counter", "Tokens whose routing was captured", None, ()),
    "vllm:caps_admitted_requests": ("counter", "Requests admitted from the waiting queue for the first time", None, ()),
    "vllm:caps_ranked_requests": ("counter", "Requests placed into free slots by the CAPS strategy", None, ()),
    "vllm:caps_engaged_steps": (
        "counter",
        "Scheduler steps with an admission decision: vLLM would admit some but "
        "not all waiting requests (slots, token budget or KV cache)",
        None,
        (),
    ),
    "vllm:caps_reordered_steps": (
        "counter",
        "Steps whose admitted requests differ from what FCFS would admit (as CAPS estimates vLLM's budgets)",
        None,
        (),
    ),
    "vllm:caps_kept_fcfs_steps": (
        "counter",
        "Steps where CAPS kept FCFS's admissions: step_cost's choice was "
        "predicted to gain no more than min_gain, or vLLM would have admitted another "
        "number of requests or fewer tokens from it",
        None,
        (),
    ),
    "vllm:caps_guard_fallback_steps": (
        "counter",
        "Steps CAPS left in FCFS order because the live guard found its "
        "recent reorderings losing on the captured routing (caps_vllm.guard)",
        None,
        (),
    ),
    "vllm:caps_guard_realized_gain_ms": (
        "histogram",
        "Per reordering, once all its requests' prompts were routed: "
        "step-cost milliseconds FCFS's admissions would have cost minus CAPS's, "
        "on the captured routing (negative: CAPS lost)",
        _GAIN_MS,
        (),
    ),
    "vllm:caps_pass_over_pinned_requests": (
        "counter",
        "Requests passed over max_passes times and then admitted ahead of the strategy (the starvation bound at work)",
        None,
        (),
    ),
    "vllm:caps_max_wait_bypass_requests": (
        "counter",
        "Requests admitted ahead of the strategy because they waited longer than max_wait_ms",
        None,
        (),
    ),
    "vllm:caps_fcfs_fallback_requests": (
        "counter",
        "Requests admitted in steps where CAPS left the FCFS order "
        "(fewer than min_batch_trigger waiting, no choice to make, no predictor, "
        "or an error)",
        None,
        (),
    ),
    "vllm:caps_predictor_fallback_requests": (
        "counter",
        "Requests without a prediction (no known prompt token, prompt embeddings): kept in FCFS place",
        None,
        (),
    ),
    "vllm:caps_predicted_on_arrival_requests": (
        "counter",
        "Requests whose load was predicted as vLLM prepared them (its input thread when serving), off the busy loop",
        None,
        (),
    ),
    "vllm:caps_plan_ahead_late_steps": (
        "counter",
        "Steps (caps.plan_ahead) whose plan the worker had not finished when schedule() ran: left FCFS",
        None,
        (),
    ),
    "vllm:caps_plan_ahead_dropped_steps": (
        "counter",
        "Steps (caps.plan_ahead) whose plan was made for a queue head that changed since (an abort, a "
        "preemption, a priority arrival) or that admitted nothing new: left FCFS",
        None,
        (),
    ),
    "vllm:caps_errors": ("counter", "Exceptions inside CAPS (the step stayed FCFS)", None, ()),
}

_families: dict[str, Counter | Histogram] = {}


def _family(name: str) -> Counter | Histogram:
    """One metric family per process, however many schedulers it builds (tests build many)."""
    fam = _families.get(name)
    if fam is None:
        kind, doc, buckets, extra = SPEC[name]
        if kind == "counter":  # prometheus_client appends _total
            fam = Counter(name, doc, _LABELS + extra)
        else:
            fam = Histogram(name, doc, _LABELS + extra, buckets=buckets)
        _families[name] = fam
    return fam


def exported() -> bool:
    """Whether the metrics reach ``vllm serve``'s /metrics (multiprocess mode is on)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


@dataclass
class CapsMetrics:
    """The label-bound children of every CAPS metric for one engine."""

    model_name: str
    engine: str

    def __post_init__(self) -> None:
        base = (self.model_name, self.engine)
        self._m = {name: _family(name).labels(*base) for name, spec in SPEC.items() if not spec[3]}
        self._per_layer: list = []  # one child per MoE layer, made on first use

    def inc(self, name: str, amount: float = 1) -> None:
        if amount:
            self._m[name].inc(amount)

    def inc_labeled(self, name: str, value: str, amount: float = 1) -> None:
        """A counter with one extra label (few values, e.g. table="learned"/"dry_run")."""
        if amount:
            _family(name).labels(self.model_name, self.engine, value).inc(amount)

    def observe(self, name: str, value: float) -> None:
        self._m[name].observe(value)

    def observe_load(self, source: str, shape: LoadShape) -> None:
        """One step's imbalance figures; ``source`` is 'predicted' or 'actual'."""
        self.observe_loads(source, [shape])

    def observe_loads(self, source: str, shapes: list[LoadShape]) -> None:
        """Several steps' imbalance figures at once (each histogram's buckets incremented once)."""
        if not shapes:
            return
        observe_many(self._m[f"vllm:caps_{source}_load_cv"], [s.cv for s in shapes])
        observe_many(self._m[f"vllm:caps_{source}_load_max_over_mean"], [s.max_over_mean for s in shapes])
        observe_many(self._m[f"vllm:caps_{source}_distinct_experts"], [s.distinct for s in shapes])
        if source == "actual":
            per_layer = np.stack([np.asarray(s.per_layer_max_over_mean, dtype=np.float64) for s in shapes])
            fam = _family("vllm:caps_actual_layer_load_max_over_mean")
            while len(self._per_layer) < per_layer.shape[1]:
                self._per_layer.append(fam.labels(self.model_name, self.engine, str(len(self._per_layer))))
            for child, values in zip(self._per_layer, per_layer.T):
                observe_many(child, values[values > 0])


def observe_many(child: Histogram, values) -> None:
    """``child.observe(v)`` for each of ``values``, as one increment per bucket and one of the sum:
    prometheus_client takes a lock per increment (and in multiprocess mode writes a file), and a
    batch of steps' figures falls into few buckets. Falls back to one ``observe`` per value for a
    prometheus_client without the histogram layout read here (``_upper_bounds``, ``_buckets``,
    ``_sum``, as in 0.4 to 0.23)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]  # (observe() counts a NaN in no bucket)
    if not len(values):
        return
    bounds, buckets, total = (getattr(child, a, None) for a in ("_upper_bounds", "_buckets", "_sum"))
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values.tolist():
            child.observe(v)
        return
    # observe() increments the first bucket whose upper bound is >= the value
    counts = np.bincount(
        np.searchsorted(np.asarray(bounds, dtype=np.float64), values, side="left"), minlength=len(bounds)
    )
    for bucket, k in zip(buckets, counts.tolist()):
        if k:
            bucket.inc(k)
    total.inc(float(values.sum()))
