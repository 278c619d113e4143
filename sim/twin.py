"""The vLLM twin: vLLM's own scheduler classes, driven on a virtual clock, with no model runner.

The class is the one a user passes to ``--scheduler-cls`` (vLLM's ``Scheduler``, or
``caps_vllm.CapsScheduler`` with any CAPS config), built from a ``VllmConfig`` with the budgets
a deployment would have (:class:`Deployment`: vLLM's defaults per hardware class unless
overridden, chunked prefill and prefix caching on as vLLM defaults them, KV blocks from a memory
budget). Each step: ``schedule()``; the step's duration from a :class:`~sim.step_time.StepTime`
model advances the clock; ``update_from_output()`` gets one synthetic sampled token per request
whose prefill is complete (a request ends at its output length: ``ignore_eos``). Arrivals are
added at the step boundary after their time, as vLLM's engine loop adds them between steps.

Only this module (and ``sim.step_time``'s MoE part, which is numpy) knows vLLM; the rest of
``sim/`` runs without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

#: vLLM 0.32's ``vllm serve`` defaults (EngineArgs._set_default_args): (max_num_seqs, max_num_batched_tokens)
HARDWARE_DEFAULTS: dict[str, tuple[int, int]] = {
    "cpu": (128, 2048),  # vLLM's CPU backend, one worker
    "gpu": (256, 2048),  # GPUs under 70 GiB, and A100s
    "h100": (1024, 8192),  # GPUs of 70-160 GiB other than A100 (H100, H200)
    "h200": (1024, 8192),
    "b200": (1024, 16384),  # GPUs of 160 GiB and more
}


@dataclass(frozen=True)
class Deployment:
    """What vLLM's scheduler is given: budgets, KV blocks and the caching switches."""

    max_num_seqs: int
    max_num_batched_tokens: int
    num_blocks: int
    block_size: int = 16
    max_model_len: int = 4096
    enable_prefix_caching: bool = True
    long_prefill_token_threshold: int = 0

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "num_blocks", "block_size", "max_model_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"deployment {name}: {v!r}; valid: an integer >= 1")

    @classmethod
    def defaults(
        cls, hardware: str, kv_bytes: float | None = None, kv_bytes_per_token: float | None = None, **overrides
    ) -> Deployment:
        """vLLM's defaults for ``hardware``; KV blocks from ``kv_bytes`` of cache memory at
        ``kv_bytes_per_token`` (both or neither; else ``num_blocks`` must be given)."""
        if hardware not in HARDWARE_DEFAULTS:
            raise ValueError(f"hardware {hardware!r}; valid: {', '.join(HARDWARE_DEFAULTS)}")
        seqs, tokens = HARDWARE_DEFAULTS[hardware]
        args = {"max_num_seqs": seqs, "max_num_batched_tokens": tokens, **overrides}
        if "num_blocks" not in args:
            if kv_bytes is None or kv_bytes_per_token is None:
                raise ValueError("give num_blocks, or kv_bytes and kv_bytes_per_token")
            args["num_blocks"] = max(1, int(kv_bytes // (kv_bytes_per_token * args.get("block_size", 16))))
        return cls(**args)


def build_scheduler(
    model_dir: str,
    cls,
    deployment: Deployment,
    caps: dict | None = None,
    policy: str = "fcfs",
    async_scheduling: bool = False,
    dtype: str = "bfloat16",
    seed: int = 0,
    parallel: dict | None = None,
):
    """``cls`` built as vLLM's engine core builds it, from a ``VllmConfig`` of ``deployment``;
    ``model_dir`` needs only a ``config.json`` (no weights, no tokenizer). ``parallel``: vLLM
    ``ParallelConfig`` fields of one engine of a data/expert-parallel server (e.g.
    ``data_parallel_size``, ``data_parallel_rank``, ``enable_expert_parallel``), which CAPS's
    deployment-aware strategies read."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, ParallelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.single_type_kv_cache_manager import register_all_kvcache_specs
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    d = deployment
    model_config = ModelConfig(
        model=model_dir, dtype=dtype, seed=seed, max_model_len=d.max_model_len, skip_tokenizer_init=True
    )
    scheduler_config = SchedulerConfig(
        max_num_seqs=d.max_num_seqs,
        max_num_batched_tokens=d.max_num_batched_tokens,
        max_model_len=d.max_model_len,
        enable_chunked_prefill=True,
        is_encoder_decoder=False,
        async_scheduling=async_scheduling,
        policy=policy,
        long_prefill_token_threshold=d.long_prefill_token_threshold,
        watermark=0.0,
    )
    cache_config = CacheConfig(
        block_size=d.block_size,
        gpu_memory_utilization=0.9,
        cache_dtype="auto",
        enable_prefix_caching=d.enable_prefix_caching,
    )
    vllm_config = VllmConfig(
        scheduler_config=scheduler_config,
        model_config=model_config,
        cache_config=cache_config,
        parallel_config=ParallelConfig(**(parallel or {})),
        # no workers, so no captured routing: the twin predicts with the dry run only
        # (a learning table resumed from the user's cache would make runs differ)
        additional_config={"caps": {"learn": False, **(caps or {})}},
    )
    # The CPU platform forces async scheduling off, and for MLA models (DeepSeek-V2-Lite) chunked
    # prefill and prefix caching off with the token budget raised to the model length; a GPU
    # deployment's twin sets them back.
    sc = vllm_config.scheduler_config
    sc.async_scheduling = async_scheduling
    sc.enable_chunked_prefill, sc.max_num_batched_tokens = True, d.max_num_batched_tokens
    vllm_config.cache_config.enable_prefix_caching = d.enable_prefix_caching
    kv_cache_config = KVCacheConfig(
        num_blocks=d.num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(
                ["layer"], FullAttentionSpec(block_size=d.block_size, num_kv_heads=1, head_size=1, dtype=torch.float32)
            )
        ],
    )
    cache_config.num_gpu_blocks = d.num_blocks
    register_all_kvcache_specs(vllm_config)
    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        block_size=d.block_size,
        log_stats=True,
        structured_output_manager=StructuredOutputManager(vllm_config),
    )


_HASHERS: dict[int, Callable] = {}


def make_request(
    rid: str,
    tokens: list[int] | None,
    arrival: float,
    max_tokens: int = 4,
    priority: int = 0,
    prompt_embeds=None,
    block_size: int = 16,
):
    """A vLLM ``Request`` as the engine's input processor makes it (greedy, ``ignore_eos``),
    with the block hasher prefix caching needs."""
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    if block_size not in _HASHERS:
        init_none_hash(sha256)
        _HASHERS[block_size] = get_request_block_hasher(block_size, sha256)
    sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sp.update_from_generation_config({}, None)
    return Request(
        request_id=rid,
        prompt_token_ids=tokens,
        sampling_params=sp,
        pooling_params=None,
        arrival_time=arrival,
        priority=priority,
        prompt_embeds=prompt_embeds,
        block_hasher=_HASHERS[block_size],
    )


def step(scheduler, finished: list[str] | None = None, worker=None):
    """One engine step, untimed (the tests drive schedulers with it): schedule, then feed back
    one sampled token per request that has computed all its known tokens (chunked prefills get
    none). Returns the SchedulerOutput; the ids of requests that finished in this step are
    appended to ``finished``. ``worker(out, mro)`` may add what a model runner would attach to
    the output (routing)."""
    out = scheduler.schedule()
    mro = runner_output(scheduler, out)
    if worker is not None:
        worker(out, mro)
    engine_outputs = scheduler.update_from_output(out, mro)
    if finished is not None:
        for eco in engine_outputs.values():
            finished += [o.request_id for o in eco.outputs if o.finish_reason is not None]
    return out


def _out_of_order(admitted: list[str], served: dict, still_waiting) -> int:
    """How many of ``admitted`` FCFS would not have picked: those younger than a request it
    left waiting (arrival order; preempted requests, which FCFS puts first, are not new)."""
    if not still_waiting:
        return 0
    oldest_left = min(r.arrival_time for r in still_waiting)
    return sum(served[rid].arrival_s > oldest_left for rid in admitted)


@dataclass(frozen=True)
class TwinRequest:
    """One simulated request: when it arrives, its prompt's token ids, how many tokens it makes."""

    rid: str
    arrival_s: float
    prompt: list[int]
    output_tokens: int
    domain: str | None = None


@dataclass
class StepRecord:
    start_s: float
    seconds: float
    tokens: int  # scheduled this step
    prefill_tokens: int
    decode_requests: int
    running: int  # after the step was scheduled
    waiting: int
    admitted: list[str]  # new requests scheduled for the first time
    waiting_before: int = 0  # requests waiting when the step was scheduled
    out_of_order: int = 0  # admitted requests that were not among the oldest waiting (FCFS's picks)
    planned: bool = False  # CAPS's planner evaluated a choice in this step
    distinct_experts: float | None = None  # mean over MoE layers, from the step model's counts
    resumed: list[str] = field(default_factory=list)  # preempted requests resumed from the waiting queue


@dataclass
class Served:
    """What one request saw: virtual times of its arrival, admission, each token, the end."""

    arrival_s: float
    admitted_s: float | None = None
    token_s: list[float] = field(default_factory=list)
    finished_s: float | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.token_s[0] - self.arrival_s if self.token_s else None

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.arrival_s

    @property
    def itl_s(self) -> list[float]:
        return list(np.diff(self.token_s))


@dataclass
class TwinResult:
    served: dict[str, Served]
    steps: list[StepRecord]
    scheduler_seconds: float  # wall time inside schedule() and update_from_output()
    simulated_seconds: float
    finished_order: list[str]


class Engine:
    """One vLLM engine of the twin: its scheduler, its clock, what it served.

    A step is split in two so that engines stepping in lockstep (expert parallelism) can be
    priced together: :meth:`begin` adds the arrivals due and calls ``schedule()``; the caller
    prices the step; :meth:`finish` moves the clock, records the step and calls
    ``update_from_output()`` with one sampled token per request whose prefill is complete.
    """

    def __init__(self, scheduler, block_size: int = 16, on_arrival: Callable | None = None, name: str = "0") -> None:
        self.scheduler = scheduler
        self.block_size = block_size
        self.on_arrival = on_arrival
        self.name = name
        self.now = 0.0
        self.inbox: list[TwinRequest] = []  # dispatched here, not yet added (arrival order)
        self.served: dict[str, Served] = {}
        self.steps: list[StepRecord] = []
        self.finished: list[str] = []
        self.busy_s = 0.0
        self.in_flight = 0  # dispatched and not finished (what vLLM's DP front end counts)
        self._planned = False  # whether the strategy chose this step's admissions
        self._ahead_for: int | None = None  # planning ahead: the step the last plan (by the strategy) is for
        # CAPS reads its wall clock for waiting times; in the twin that is the engine's clock.
        if hasattr(scheduler, "caps"):
            scheduler.caps.clock = lambda: self.now

    def dispatch(self, r: TwinRequest) -> None:
        self.inbox.append(r)
        self.in_flight += 1

    def has_work(self) -> bool:
        return bool(self.inbox) or self.scheduler.has_unfinished_requests()

    def next_arrival(self) -> float | None:
        return self.inbox[0].arrival_s if self.inbox else None

    def _admit_due(self) -> None:
        sched, k = self.scheduler, 0
        while k < len(self.inbox) and self.inbox[k].arrival_s <= self.now:
            r = self.inbox[k]
            req = make_request(
                r.rid, list(r.prompt), r.arrival_s, max_tokens=r.output_tokens, block_size=self.block_size
            )
            if self.on_arrival is not None:
                self.on_arrival(r, req)
            sched.add_request(req)
            self.served[r.rid] = Served(r.arrival_s)
            k += 1
        del self.inbox[:k]

    def begin(self):
        """Add what has arrived by now and schedule a step: the SchedulerOutput (None when there
        is nothing to run yet: the clock then jumps to the next arrival)."""
        self._admit_due()
        sched = self.scheduler
        if not sched.has_unfinished_requests():
            if self.inbox:
                self.now = max(self.now, self.inbox[0].arrival_s)
            return None
        self._waiting_before = len(sched.waiting)
        planner = getattr(getattr(sched, "caps", None), "planner", None)
        self._plans_before = planner.stats.plans if planner is not None else None
        t0 = time.perf_counter()
        out = sched.schedule()
        self.busy_s += time.perf_counter() - t0
        made = planner is not None and planner.stats.plans > self._plans_before
        caps = getattr(sched, "caps", None)
        if caps is not None and caps.worker is not None:  # planning ahead: the plan made now is the next step's
            self._planned = self._ahead_for == caps.used == caps.step
            self._ahead_for = caps.expected if made else None
        else:
            self._planned = made
        if not out.num_scheduled_tokens:
            if not self.inbox:
                raise RuntimeError("twin: the scheduler can schedule nothing and no request will arrive")
            sched.update_from_output(out, runner_output(sched, out))
            self.now = max(self.now, self.inbox[0].arrival_s)  # nothing fits: wait for the next arrival
            return None
        return out

    def finish(self, out, dt: float, counts: np.ndarray | None = None, expected: bool = False) -> StepRecord:
        """The step took ``dt`` seconds: advance the clock, note what came out, update vLLM.
        ``counts``: the step's per-expert loads (expected values if ``expected``), for its
        distinct-experts statistic."""
        if not dt > 0:
            raise ValueError(f"step time must be > 0 s, got {dt!r}")
        sched, start = self.scheduler, self.now
        self.now += dt
        prefill = decode = 0
        for rid, n in out.num_scheduled_tokens.items():
            req = sched.requests[rid]
            s = self.served[rid]
            if req.num_computed_tokens >= req.num_tokens:
                s.token_s.append(self.now)  # its next token comes out of this step
            if req.num_computed_tokens - n < req.num_prompt_tokens:
                prefill += n
            else:
                decode += 1
            if s.admitted_s is None:
                s.admitted_s = start
        running, waiting = len(sched.running), len(sched.waiting)
        admitted = [r.req_id for r in out.scheduled_new_reqs]
        t0 = time.perf_counter()
        engine_outputs = sched.update_from_output(out, runner_output(sched, out))
        self.busy_s += time.perf_counter() - t0
        done = [o.request_id for eco in engine_outputs.values() for o in eco.outputs if o.finish_reason is not None]
        for rid in done:
            self.served[rid].finished_s = self.now
        self.finished += done
        self.in_flight -= len(done)
        rec = StepRecord(
            start,
            dt,
            sum(out.num_scheduled_tokens.values()),
            prefill,
            decode,
            running,
            waiting,
            admitted,
            self._waiting_before,
            _out_of_order(admitted, self.served, sched.waiting) if self._waiting_before >= 2 and admitted else 0,
            self._planned,
            _distinct(counts, expected),
            sorted(out.scheduled_cached_reqs.resumed_req_ids),
        )
        self.steps.append(rec)
        return rec

    def result(self) -> TwinResult:
        return TwinResult(self.served, self.steps, self.busy_s, self.now, self.finished)


def _distinct(counts: np.ndarray | None, expected: bool) -> float | None:
    """Experts touched per layer, averaged over layers (expected counts: 1 - exp(-count) each)."""
    if counts is None or not counts.size:
        return None
    touched = -np.expm1(-counts) if expected else (counts > 0)
    return float(touched.sum(axis=-1).mean())


def runner_output(sched, out):
    """What a model runner returns for ``out``: one sampled token per request that has now
    computed all its known tokens (a chunked prefill gets none)."""
    from vllm.v1.outputs import ModelRunnerOutput

    ids = list(out.num_scheduled_tokens)
    sampled = [[7] if sched.requests[rid].num_computed_tokens >= sched.requests[rid].num_tokens else [] for rid in ids]
    return ModelRunnerOutput(
        req_ids=ids,
        req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=sampled,
        logprobs=None,
        prompt_logprobs_dict={},
        pooler_output=[],
    )


class Twin:
    """One engine over a list of arrivals (see the module's docstring).

    ``step_time(scheduler, out)`` returns the seconds a step takes; it is called after
    ``schedule()``, when the scheduled requests' ``num_computed_tokens`` already count the
    step's tokens (``out.num_scheduled_tokens`` says how many); a ``last_counts`` attribute on
    it (the step's per-expert counts) feeds the distinct-experts statistic.
    """

    def __init__(
        self,
        scheduler,
        step_time: Callable,
        block_size: int = 16,
        max_steps: int = 10_000_000,
        on_arrival: Callable | None = None,
    ) -> None:
        """``on_arrival(twin_request, vllm_request)`` runs as each request is added (the study
        binds its routing and gives CAPS its vector there)."""
        self.engine = Engine(scheduler, block_size, on_arrival)
        self.scheduler = scheduler
        self.step_time = step_time
        self.max_steps = max_steps

    def run(self, requests: Sequence[TwinRequest], progress: Callable[[float], None] | None = None) -> TwinResult:
        if len({r.rid for r in requests}) != len(requests):
            raise ValueError("twin: request ids must be unique")
        eng = self.engine
        for r in sorted(requests, key=lambda r: (r.arrival_s, r.rid)):
            eng.dispatch(r)
        while eng.has_work():
            if len(eng.steps) >= self.max_steps:
                raise RuntimeError(f"twin: no end after {self.max_steps} steps")
            out = eng.begin()
            if out is None:
                continue
            dt = float(self.step_time(self.scheduler, out))  # the step model: not counted as scheduler time
            eng.finish(
                out,
                dt,
                getattr(self.step_time, "last_counts", None),
                getattr(getattr(self.step_time, "routing", None), "expected", False),
            )
            if progress is not None:
                progress(eng.now)
        return eng.result()


class VectorSpace:
    """Stands in for CAPS's predictor where the twin hands every request its vector itself
    (``request.caps_vector``, which CAPS reads before predicting): it says only how long the
    vectors are."""

    def __init__(self, layers: int, experts: int, top_k: int) -> None:
        self.layers, self.num_experts, self.top_k = layers, experts, top_k
        self.d = layers * experts
        self.moe_layers = tuple(range(layers))
        self.vocab = 0

    def vector(self, ids, per_token: bool = False) -> None:
        return None  # a request the twin gave no vector keeps its FCFS place


def with_vectors(cls, space: VectorSpace):
    """A CAPS scheduler class (e.g. ``caps_vllm.CapsScheduler``) whose predictor is ``space``
    and whose plans made ahead (``plan_ahead``) are made as a worker that is never late would,
    at the end of ``schedule()``; everything else is the class itself."""
    caps = type("Caps", (cls.caps_class,), {"_load_predictor": lambda self, vllm_config: space, "inline_ahead": True})
    return type(cls.__name__, (cls,), {"caps_class": caps})
