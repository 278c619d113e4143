"""Offline discrete-event simulator of a batch server that admits requests with a CAPS strategy.

It calls the same strategy objects as the live vLLM scheduler (``caps_vllm.strategies``) and
imports no vLLM.
"""

import os

# The simulator's matrices are tiny (32 x 60): BLAS threads only contend with the sweep's
# worker processes. Takes effect when sim is imported before numpy (python -m sim.evaluate).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
