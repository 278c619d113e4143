"""How many threads numpy's BLAS may use in the engine process.

CAPS's matrix products on the busy loop are small (a window of candidates by one load vector,
a few hundred by a few thousand). numpy's OpenBLAS starts a pool of one thread per core and
wakes it for each product; in an EngineCore process whose cores the model's own threads (torch)
also spin on, that hand-off costs more than the product: a 96 x 240 Gram update measured 7.6 ms
there against 0.2 ms on one thread (``tests/benchmarks/bench_scheduler.py``). vLLM itself runs
its tensors through torch, not numpy's BLAS, so one thread loses nothing. numpy has no call
for this, so the library it loaded is asked directly (as threadpoolctl does).
"""

from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

_SETTERS = (
    "scipy_openblas_set_num_threads64_",
    "scipy_openblas_set_num_threads",
    "openblas_set_num_threads64_",
    "openblas_set_num_threads",
)


def limit_threads(n: int) -> str | None:
    """Set numpy's OpenBLAS to ``n`` threads; the library's path, or None if none was found
    (another BLAS, or a numpy built differently: then nothing changes)."""
    root = os.path.dirname(os.path.dirname(np.__file__))
    for path in sorted(
        glob.glob(os.path.join(root, "numpy.libs", "*openblas*"))
        + glob.glob(os.path.join(os.path.dirname(np.__file__), ".dylibs", "*openblas*"))
    ):
        try:
            lib = ctypes.CDLL(path)  # already loaded by numpy: the same handle
        except OSError:
            continue
        for name in _SETTERS:
            setter = getattr(lib, name, None)
            if setter is not None:
                setter(int(n))
                return path
    return None
