"""CAPS settings, read from ``--additional-config '{"caps": {...}}'`` and checked at startup.

An invalid value stops the engine before it serves, with an error that names the field and
its valid range; no vLLM import, so it is tested without an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from caps_vllm.strategies import STRATEGIES, make_strategy


@dataclass(frozen=True)
class CapsConfig:
    #: batch-selection strategy (see caps_vllm.strategies); step_cost reads the regime
    #: (one device or expert parallel) from vLLM
    strategy: str = "step_cost"
    #: extra keyword arguments of the strategy, e.g. {"sample": 8} for power_of_d
    strategy_params: dict = field(default_factory=dict)
    #: how many waiting requests beyond those FCFS would admit this step the strategy may choose from
    window_size: int = 32
    #: below this many waiting requests, admission is plain FCFS (2: whenever there is a choice)
    min_batch_trigger: int = 2
    #: a request passed over (a younger one admitted while it waits) this many steps is admitted
    #: ahead of the strategy: nobody is overtaken in more than max_passes steps (0: FCFS)
    max_passes: int = 4
    #: step_cost keeps FCFS's admissions unless its own are predicted to make the MoE part of the
    #: decode steps they share cheaper by more than this share (0.02: 2 %; chosen in the twin,
    #: where smaller predicted gains bought nothing and cost the passed-over requests' TTFT)
    min_gain: float = 0.02
    #: reorderings the live guard judges on the captured routing (caps_vllm.guard): when the
    #: last this many lost in total against FCFS, admission falls back to FCFS (0: no guard)
    guard_window: int = 64
    #: a request waiting longer than this is admitted ahead of the strategy (null: never; under
    #: overload every request passes any fixed bound, and the order becomes FCFS)
    max_wait_ms: float | None = None
    #: "per_token": a request's load is its routing per prompt token (what it adds to each
    #: decode step, equal mass for every request); "counts": total over the prompt
    vectors: str = "per_token"
    #: seed of the randomised strategies
    seed: int = 0
    #: router dry-run predictor on/off (off: CAPS orders like FCFS, for A/B runs)
    predictor: bool = True
    #: count the experts the model actually routed to, per step, on the workers
    capture: bool = True
    #: export CAPS's Prometheus metrics (see docs/metrics.md)
    metrics: bool = True
    #: learn the token -> expert table online from the captured routing, with the router dry
    #: run as the prior (caps_vllm.learned_table); the state is kept next to the router table
    learn: bool = True
    #: prompt tokens per step whose routed expert ids the workers send back for learning
    learn_rows_per_step: int = 256
    #: token ids the learning table tracks (memory: this x MoE layers x experts x 4 bytes)
    learn_max_tokens: int = 8192
    #: learned routing halves its weight after this many more learned tokens
    learn_half_life_tokens: float = 2e6
    #: per-request counts of decode tokens too, for the prompt -> decode accuracy metrics
    #: (one [layers, experts] matrix per running request per step; off by default)
    capture_decode: bool = False
    #: where the router token tables are cached (default ~/.cache/caps_vllm or $CAPS_VLLM_CACHE)
    cache_dir: str | None = None
    #: threads of numpy's BLAS in the engine process (caps_vllm.blas: CAPS's products are
    #: small, and a pool woken for each competes with the model's threads); null: numpy's own
    blas_threads: int | None = 1
    #: plan each step's admissions on a worker thread while the model runs the step before
    #: (caps_vllm.ahead; the plan is made from the state that step leaves and applied only if
    #: the queue's head is unchanged): schedule() then only applies it. null: on where the model
    #: runs on an accelerator (the busy loop waits for it with the GIL free), off on CPU
    plan_ahead: bool | None = None
    #: append one JSON line per engine step and per finished request here (caps_vllm.step_log:
    #: the timings the simulator's cpu profile is fitted on); data-parallel rank N writes PATH.N
    step_log: str | None = None

    @classmethod
    def from_dict(cls, raw: Any) -> CapsConfig:
        """Validate user input; ValueError names the field and the valid range."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ValueError(f'additional_config "caps" must be an object, got {type(raw).__name__}')
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown CAPS option(s) {unknown}; valid options: {sorted(known)}")
        cfg = cls(**raw)
        cfg._check()
        return cfg

    def _check(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"caps.strategy: {self.strategy!r} is not a strategy; valid: {', '.join(STRATEGIES)}")
        if not isinstance(self.strategy_params, dict):
            raise ValueError("caps.strategy_params: must be an object of keyword arguments")
        if not STRATEGIES[self.strategy].deployment_params:
            # (deployment-aware ones are checked when the scheduler knows the model and vLLM's
            # parallel layout, still before the engine serves)
            make_strategy(self.strategy, seed=0, **self.strategy_params)  # raises a named ValueError
        _int_in("window_size", self.window_size, 1, 4096)
        _int_in("min_batch_trigger", self.min_batch_trigger, 1, 1_000_000)
        _int_in("max_passes", self.max_passes, 0, 1_000_000)
        _int_in("seed", self.seed, 0, 2**32 - 1)
        _int_in("guard_window", self.guard_window, 0, 100_000)
        if self.max_wait_ms is not None and (
            isinstance(self.max_wait_ms, bool)
            or not isinstance(self.max_wait_ms, (int, float))
            or not 0 < self.max_wait_ms <= 3.6e6
        ):
            raise ValueError(
                f"caps.max_wait_ms: {self.max_wait_ms!r} is out of range; valid: a number in (0, 3600000] or null"
            )
        if (
            isinstance(self.min_gain, bool)
            or not isinstance(self.min_gain, (int, float))
            or not 0 <= self.min_gain <= 1
        ):
            raise ValueError(f"caps.min_gain: {self.min_gain!r} is out of range; valid: a number in [0, 1]")
        if self.vectors not in ("per_token", "counts"):
            raise ValueError(f"caps.vectors: {self.vectors!r}; valid: 'per_token' or 'counts'")
        if self.blas_threads is not None:
            _int_in("blas_threads", self.blas_threads, 1, 4096)
        _int_in("learn_rows_per_step", self.learn_rows_per_step, 1, 1_000_000)
        _int_in("learn_max_tokens", self.learn_max_tokens, 8, 100_000_000)
        if (
            isinstance(self.learn_half_life_tokens, bool)
            or not isinstance(self.learn_half_life_tokens, (int, float))
            or not 1 <= self.learn_half_life_tokens <= 1e15
        ):
            raise ValueError(
                f"caps.learn_half_life_tokens: {self.learn_half_life_tokens!r} is out of range; "
                "valid: a number in [1, 1e15]"
            )
        for name in ("predictor", "capture", "metrics", "learn", "capture_decode"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"caps.{name}: {getattr(self, name)!r}; valid: true or false")
        if self.plan_ahead is not None and not isinstance(self.plan_ahead, bool):
            raise ValueError(f"caps.plan_ahead: {self.plan_ahead!r}; valid: true, false or null")
        for name in ("cache_dir", "step_log"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"caps.{name}: {getattr(self, name)!r}; valid: a path or null")


def _int_in(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"caps.{name}: {value!r} is out of range; valid: an integer in [{lo}, {hi}]")
