"""Where CAPS's own time goes in one twin cell: printed figures, not a test.

Runs ``python -m sim.twin_run`` with the given arguments in this process, with each of CAPS's
busy-loop hooks and their main parts wrapped in a timer (the thread's CPU time, which the
machine's neighbours move less than the wall clock), and prints each part's total, calls and
time per call. The code timed is the checkout in the working directory, so the same command run
from a worktree of another commit times that commit:

    python tests/benchmarks/bench_caps_parts.py --model deepseek-v2-lite --hardware h100 \\
        --routing ../shared/data/routing/esft_routing.npz --output-tokens 128 --pattern bursty \\
        --rate 320.142 --requests 1920 --strategies step_cost --caps-config '{"metrics": true}' \\
        --no-progress --out /tmp/caps-parts
"""

from __future__ import annotations

import collections
import functools
import os
import sys
import time

sys.path.insert(0, os.getcwd())  # the checkout to time

from caps_vllm import admission, observer, runtime  # noqa: E402

PARTS = {
    runtime.Caps: (
        "before_schedule",
        "after_schedule",
        "on_output",
        "after_output",
        "reorder",
        "decide",
        "apply_plan",
        "_run_ahead",
        "routing",
        "capacity",
        "shared_load",
        "track_admitted",
        "_observe_schedule",
        "predict",
    ),
    observer.RoutingObserver: ("on_schedule", "on_admission", "flush"),
    admission.AdmissionPlanner: ("plan", "_choose"),
}


class Parts:
    """Each of CAPS's busy-loop hooks and their main parts wrapped in a timer (the thread's CPU
    time), counted while ``on``; ``report()`` prints each part's total, calls and time per call."""

    def __init__(self) -> None:
        self.spent: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self.on = True
        for cls, names in PARTS.items():
            for name in names:
                if hasattr(cls, name):
                    setattr(cls, name, self._timed(f"{cls.__name__}.{name}", getattr(cls, name)))

    def _timed(self, label, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            t0 = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.on:
                    self.spent[label] += time.thread_time() - t0
                    self.calls[label] += 1

        return wrapper

    def report(self, per: int | None = None) -> None:
        """Totals, or with ``per`` the time per step over that many steps."""
        if per is None:
            print(f"{'part (thread CPU time)':36s} {'total ms':>10s} {'calls':>8s} {'us/call':>9s}")
        else:
            print(f"    {'part (thread CPU time)':36s} {'ms a step':>10s} {'calls a step':>13s}")
        for label, s in sorted(self.spent.items(), key=lambda kv: -kv[1]):
            if per is None:
                print(f"{label:36s} {s * 1e3:10.1f} {self.calls[label]:8d} {s / self.calls[label] * 1e6:9.1f}")
            else:
                print(f"    {label:36s} {s * 1e3 / per:10.3f} {self.calls[label] / per:13.1f}")


def main() -> None:
    parts = Parts()
    import sim.twin_run

    sys.argv = ["twin_run", *sys.argv[1:]]
    sim.twin_run.main()
    parts.report()


if __name__ == "__main__":
    main()
