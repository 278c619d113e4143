"""CAPS's per-step work on a thread of its own, while the engine waits for the forward pass.

vLLM's busy loop calls ``schedule()``, hands the batch to the model and waits for its output
(``future.result()``: the GIL is free, the CPU idle) before ``update_from_output()``. With
``plan_ahead`` CAPS does its work in that wait: right after ``schedule()`` of step t the busy
loop hands this worker a job (that step's output and a snapshot of the queue's head) and goes
on; the worker counts the step's metrics and plans the admission order of step t + 1 from the
state step t left. ``schedule()`` of step t + 1 only applies that plan, and only if the queue's
head is still the one it was made for (:meth:`caps_vllm.runtime.Caps.before_schedule`): the
busy loop's share of CAPS is a snapshot and a check, whatever the plan costs.

Jobs run one at a time, in the order the busy loop submits them: with a worker, every CAPS
hook that touches CAPS's state (the routing metrics and learning after the forward pass too)
hands its work over as a job, reading on the busy loop only what vLLM may change or free, so
CAPS's state is never touched by two threads at once and the busy loop never waits for the
worker. A job is told whether a newer one of its kind waits: then a plan is stale before it
is made, and only its bookkeeping runs. ``inline``: each job runs as it is submitted, on
the caller's thread (the twin, sim/twin.py: the same decisions as a worker that is never late,
deterministic on a virtual clock). Pure Python, no vLLM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("caps_vllm.scheduler")


class Worker:
    """One daemon thread running ``run(job, stale)`` for each submitted job, in order (``stale``:
    a job of the same type was submitted after it and waits)."""

    def __init__(
        self, run: Callable[[Any, bool], None], name: str = "caps-plan-ahead", inline: bool = False, limit: int = 256
    ) -> None:
        """``limit``: jobs that may wait; beyond it a job is refused (a worker that far behind
        the engine would only grow its queue)."""
        self._run = run
        self.inline = inline
        self.limit = limit
        self._jobs: deque = deque()
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self.seconds = 0.0  # wall time of the jobs, summed (off the busy loop)
        self.jobs = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Any) -> bool:
        """Queue ``job`` (False: refused, ``limit`` jobs wait already)."""
        if self.inline:
            self._job(job, False)
            return True
        with self._cv:
            if len(self._jobs) >= self.limit:
                return False
            self._jobs.append(job)
            self._cv.notify()
        return True

    def idle(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has run (True) or ``timeout`` seconds pass (False)."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Run what is queued, then stop the thread."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._closed)
                if not self._jobs:
                    return  # closed and drained
                job = self._jobs.popleft()
                stale = any(type(later) is type(job) for later in self._jobs)
                self._busy = True
            try:
                self._job(job, stale)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _job(self, job: Any, stale: bool) -> None:
        t0 = time.perf_counter()
        try:
            self._run(job, stale)
        except Exception:  # the runner guards its parts; this is the last line: the thread must live on
            logger.exception("CAPS plan-ahead job failed")
        finally:
            self.seconds += time.perf_counter() - t0
            self.jobs += 1
