"""The discrete-event loop of a single batch server (the prototype's execution model).

Requests queue in arrival order. When the server is idle it dispatches a batch as soon as
``min_batch_trigger`` requests wait, or ``flush_ms`` after it had work to do (it became idle
with requests waiting, or the first request reached an empty queue), or when no more requests
will arrive. The timer depends only on times and queue length, never on which requests a
strategy left behind, so strategies differ only through their picks. The strategy picks up to ``max_batch`` of the oldest ``window``
requests; the batch runs to completion for the execution model's time. Between events the
clock jumps: the next arrival, the flush deadline, or a batch's completion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from caps_vllm.strategies import Strategy, check_loads
from sim.execution import ExecutionModel
from sim.workload import Workload


@dataclass(frozen=True)
class ServerConfig:
    max_batch: int = 8
    window: int = 32
    min_batch_trigger: int = 16
    flush_ms: float = 100.0  # the prototype's scheduling_interval_ms


@dataclass
class RunResult:
    completion: np.ndarray  # (n,) seconds
    batch_loads: np.ndarray  # (batches, d) expert load of each dispatched batch
    batch_sizes: np.ndarray  # (batches,)
    workload: Workload

    @property
    def latency(self) -> np.ndarray:
        return self.completion - self.workload.arrival


def simulate(
    wl: Workload, vectors: np.ndarray, strategy: Strategy, server: ServerConfig, model: ExecutionModel
) -> RunResult:
    """Run ``wl`` through the server; every request completes exactly once."""
    n = len(wl)
    if vectors.shape[0] != n:
        raise ValueError(f"{vectors.shape[0]} expert vectors for {n} requests")
    check_loads(vectors, "expert vectors")  # once here, so each selection can skip it
    arrival = wl.arrival
    idle_load = np.zeros(vectors.shape[1])
    completion = np.full(n, math.nan)
    loads: list[np.ndarray] = []
    sizes: list[int] = []
    queue: list[int] = []
    t, nxt = 0.0, 0
    ready = 0.0  # when the server last became idle with work to do
    flush_s = server.flush_ms / 1000.0
    while nxt < n or queue:
        while nxt < n and arrival[nxt] <= t:
            queue.append(nxt)
            nxt += 1
        if not queue:
            t = ready = float(arrival[nxt])
            continue
        short = server.min_batch_trigger - len(queue)
        if short > 0 and nxt < n:
            fill_at = float(arrival[nxt + short - 1]) if nxt + short - 1 < n else math.inf
            wake = min(fill_at, ready + flush_s)
            if wake > t:
                t = wake
                continue
        window = queue[: server.window]
        picks = strategy.select(idle_load, vectors[window], server.max_batch, checked=True)
        batch = [window[p] for p in picks]
        for p in sorted(picks, reverse=True):
            del queue[p]
        load = vectors[batch].sum(axis=0)
        t += model.batch_time(wl.prompt_tokens[batch], wl.output_tokens[batch], vectors[batch])
        ready = t
        completion[batch] = t
        loads.append(load)
        sizes.append(len(batch))
    return RunResult(completion, np.asarray(loads), np.asarray(sizes), wl)
