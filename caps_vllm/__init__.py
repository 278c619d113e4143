"""caps-vllm: content-aware prioritized scheduling (CAPS) for Mixture-of-Experts models in vLLM.

``vllm serve MODEL --scheduler-cls caps_vllm.CapsScheduler``. Importing this package does not
import vLLM (the scheduler is loaded on first access): the strategies and the simulator run
without it.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("CapsScheduler", "CapsAsyncScheduler"):
        try:
            from caps_vllm import scheduler
        except ImportError as exc:
            if not (exc.name or "").split(".")[0] == "vllm":
                raise
            raise ImportError(
                f"caps_vllm.{name} runs inside vLLM, which cannot be imported here ({exc}). Install it: "
                "`pip install -e '.[gpu]'` (vLLM) on a GPU host, `make setup` (vLLM's CPU build) on a CPU one. "
                "The strategies (caps_vllm.strategies) and the simulator (python -m sim.evaluate) run without it."
            ) from exc
        return getattr(scheduler, name)
    raise AttributeError(f"module 'caps_vllm' has no attribute {name!r}")
