"""caps-vllm: content-aware prioritized scheduling (CAPS) for Mixture-of-Experts models in vLLM.

Importing this package does not import vLLM: the strategies and the simulator run without it.
"""

__version__ = "0.1.0"
