"""Execution-time models: how long a batch takes given its requests and its expert load.

The engine only calls :meth:`ExecutionModel.batch_time`; later models (fitted to measured
kernel times, expert parallel) plug in behind the same interface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class ExecutionModel(Protocol):
    def batch_time(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray, load: np.ndarray) -> float:
        """Seconds the server is busy with this batch (run to completion, static batching)."""
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

    def batch_time(self, prompt_tokens: np.ndarray, output_tokens: np.ndarray, load: np.ndarray) -> float:
        base = self.fixed_s + self.prefill_s_per_token * float(prompt_tokens.sum()) + self.decode_s_per_step * float(output_tokens.max())
        return base * (1.0 + coefficient_of_variation(load) * self.sensitivity)
