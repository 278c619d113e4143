"""Execution-time models: how long a batch takes given its requests and their expert loads.

The engine only calls :meth:`ExecutionModel.batch_time`. Three models:

- :class:`CVModel`, the prototype's: a base time inflated by the load's coefficient of
  variation (a made-up sensitivity, kept for comparison);
- :class:`StepModel` on one device: a prefill step, then one decode step per output token
  while requests remain, each MoE layer priced by the step-cost model fitted to measured
  kernel times (:mod:`caps_vllm.step_cost`);
- :class:`StepModel` with a placement: expert parallelism, each layer waits for its
  slowest rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from caps_vllm.step_cost import StepCostModel


class ExecutionModel(Protocol):
    def batch_time(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray, vectors: np.ndarray) -> float:
        """Seconds the server is busy with this batch (run to completion, static batching);
        ``vectors`` holds the batch's requests' expert loads, one row each."""
        ...


def coefficient_of_variation(load: np.ndarray) -> float:
    """std/mean of the per-expert load; 0 for an empty load."""
    mean = load.mean()
    return float(load.std() / mean) if mean > 0 else 0.0


@dataclass(frozen=True)
class CVModel:
    """The prototype's model: base_time x (1 + CV(load) x sensitivity).

    base_time = fixed + prefill per prompt token of the batch + decode per step, where the
    batch decodes for as many steps as its longest output. CV over the flattened
    layers x experts load is the prototype's proxy for the straggler effect.
    """

    fixed_s: float = 0.002
    prefill_s_per_token: float = 0.00001
    decode_s_per_step: float = 0.0004
    sensitivity: float = 3.5

    def batch_time(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray, vectors: np.ndarray) -> float:
        load = vectors.sum(axis=0)
        base = (
            self.fixed_s
            + self.prefill_s_per_token * float(prompt_tokens.sum())
            + self.decode_s_per_step * float(output_tokens.max())
        )
        return base * (1.0 + coefficient_of_variation(load) * self.sensitivity)


@dataclass(frozen=True)
class StepModel:
    """Step by step: one prefill step of every prompt token, then a decode step per output
    token with the requests still generating. Each step costs ``model_layers`` MoE layers
    (the vectors' layers, repeated to that number) plus ``other_ms`` per step for everything
    that is not MoE (attention, dense layers; not measured here, 0 by default).

    A request's decode tokens are routed like its prompt tokens: its per-token vector (counts
    over prompt length when the vectors are counts) is the expected per-expert count it adds
    to each decode step. With ``placement`` (expert -> rank) a layer waits for its slowest rank.
    """

    cost: StepCostModel
    experts: int = 60
    vectors: str = "counts"  # what the workload's vectors hold (WorkloadConfig.vectors)
    model_layers: int = 24
    placement: tuple[int, ...] | None = None
    other_ms: float = 0.0

    def step_ms(self, counts: np.ndarray, expected: bool) -> float:
        """Milliseconds of one step whose per-layer expert counts are ``counts`` (layers*experts)."""
        layers = counts.reshape(-1, self.experts)
        placement = None if self.placement is None else np.asarray(self.placement)
        per_layer = self.cost.layer_ms(layers, placement, expected)
        return float(per_layer.mean()) * self.model_layers + self.other_ms

    def batch_time(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray, vectors: np.ndarray) -> float:
        tokens = np.maximum(prompt_tokens, 1).astype(np.float64)[:, None]
        per_token = vectors / tokens if self.vectors == "counts" else vectors
        prompt = vectors if self.vectors == "counts" else vectors * tokens
        ms = self.step_ms(prompt.sum(axis=0), expected=self.vectors != "counts")
        done = 0
        for steps in np.unique(output_tokens):  # the active set only changes where one finishes
            active = output_tokens >= steps
            ms += (int(steps) - done) * self.step_ms(per_token[active].sum(axis=0), expected=True)
            done = int(steps)
        return ms / 1000.0
