"""Offline simulation of CAPS.

* the twin (``sim.twin``, ``sim.step_time``): vLLM's own scheduler classes, stock and CAPS,
  driven on a virtual clock with a step-time model; the only part that imports vLLM;
* the prototype's discrete-event simulator of a static batch server (``sim.engine``,
  ``sim.evaluate``), kept to reproduce the prototype's figures; it calls the same strategy
  objects as the live scheduler (``caps_vllm.strategies``).
"""

import os

# The simulator's matrices are tiny (32 x 60): BLAS threads only contend with the sweep's
# worker processes. Takes effect when sim is imported before numpy (python -m sim.evaluate).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
