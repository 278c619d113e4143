"""Build vLLM schedulers and requests directly, without a model runner (vLLM's own test
helpers are not in the wheel): the twin's builders (``sim/twin.py``) with the tests' defaults.
Used by the scheduler tests and the benchmarks."""

from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler

from sim.twin import Deployment, build_scheduler, make_request, step

__all__ = ["make_request", "make_scheduler", "step"]


def make_scheduler(
    model: str,
    cls=Scheduler,
    caps: dict | None = None,
    max_num_seqs: int = 16,
    max_num_batched_tokens: int = 8192,
    num_blocks: int = 10000,
    policy: str = "fcfs",
    async_scheduling: bool = False,
    enable_prefix_caching: bool = False,
):
    deployment = Deployment(
        max_num_seqs,
        max_num_batched_tokens,
        num_blocks,
        max_model_len=2048,
        enable_prefix_caching=enable_prefix_caching,
    )
    return build_scheduler(
        model, cls, deployment, caps=caps, policy=policy, async_scheduling=async_scheduling, dtype="float32"
    )
