"""caps-vllm: content-aware prioritized scheduling (CAPS) for Mixture-of-Experts models in vLLM.

``vllm serve MODEL --scheduler-cls caps_vllm.CapsScheduler``. Importing this package does not
import vLLM (the scheduler is loaded on first access): the strategies and the simulator run
without it.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("CapsScheduler", "CapsAsyncScheduler"):
        from caps_vllm import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'caps_vllm' has no attribute {name!r}")
