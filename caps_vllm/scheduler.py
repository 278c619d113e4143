"""The CAPS scheduler for vLLM: ``--scheduler-cls caps_vllm.CapsScheduler``.

It only decides *order*: before vLLM's own ``schedule()`` runs, CAPS reorders the waiting queue
(caps_vllm.runtime, caps_vllm.admission); vLLM then admits from the front while its budgets
allow (tokens, KV blocks, max sequences, LoRA, prefix cache, connectors, speculative decoding),
exactly as with the stock class. The subclass here is the whole hook: it builds one
:class:`~caps_vllm.runtime.Caps` object, which owns CAPS's state, and calls into it around
``schedule()`` and ``update_from_output()`` (and where requests arrive, are aborted, or the
engine stops).

``CapsScheduler`` picks the synchronous or the asynchronous base class from
``scheduler_config.async_scheduling``, so the async overlap on GPUs is kept.
"""

from __future__ import annotations

import logging

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import FCFSRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from caps_vllm import vllm_state as vs
from caps_vllm.logs import route_logs_through_vllm
from caps_vllm.runtime import Caps

logger = logging.getLogger("caps_vllm.scheduler")


class PriorityOrderQueue(FCFSRequestQueue):
    """The priority policy as an ordered deque, so CAPS can reorder inside a priority level.

    Requests are kept in vLLM's priority order (``Request.__lt__``: priority, then arrival
    time, then id), inserted from the back, so new arrivals cost O(1) and vLLM's own order
    holds exactly until CAPS reorders the leading requests of the best priority.
    """

    def add_request(self, request: Request) -> None:
        i = len(self)
        while i > 0 and request < self[i - 1]:
            i -= 1
        self.insert(i, request)

    def prepend_request(self, request: Request) -> None:
        self.add_request(request)  # as in vLLM's priority queue: no front, only order

    def prepend_requests(self, requests) -> None:
        for request in requests:
            self.add_request(request)


class _CapsMixin:
    """Admission-order policy on top of a vLLM scheduler class: calls into ``self.caps``."""

    caps_class: type[Caps] = Caps  # what the twin swaps for one with its own vectors

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        route_logs_through_vllm()
        self.caps = self.caps_class(self)
        if vs.by_priority(self):
            self.waiting = PriorityOrderQueue()
        logger.info(
            "CAPS scheduler (%s): %s", "async" if isinstance(self, AsyncScheduler) else "sync", self.caps.config
        )

    @property
    def _caps(self) -> Caps | None:
        """None for an object built without CAPS's __init__ (vLLM's tests do so): it acts as the stock class."""
        return self.__dict__.get("caps")

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        if self._caps is not None:
            self.caps.added(request)

    def finish_requests(self, request_ids, finished_status):
        aborted = super().finish_requests(request_ids, finished_status)
        if self._caps is not None:
            self.caps.aborted(aborted)
        return aborted

    def shutdown(self) -> None:
        super().shutdown()
        if self._caps is not None:
            self.caps.shutdown()

    def schedule(self, *args, **kwargs):
        caps = self._caps
        if caps is None:
            return super().schedule(*args, **kwargs)
        caps.before_schedule(vs.holds_prefills(self, *args, **kwargs))
        out = super().schedule(*args, **kwargs)
        caps.after_schedule(out)
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        caps = self._caps
        if caps is None:
            return super().update_from_output(scheduler_output, model_runner_output)
        record = caps.on_output(model_runner_output)  # before vLLM frees the requests that finished
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        caps.after_output(outputs, record)
        return outputs


class CapsAsyncScheduler(_CapsMixin, AsyncScheduler):
    """CAPS over vLLM's AsyncScheduler (GPU serving with async scheduling)."""


class CapsScheduler(_CapsMixin, Scheduler):
    """CAPS over vLLM's Scheduler; constructs :class:`CapsAsyncScheduler` when async is on."""

    def __new__(cls, *args, **kwargs):
        if cls is CapsScheduler:
            vllm_config = kwargs.get("vllm_config", args[0] if args else None)
            if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
                return CapsAsyncScheduler(*args, **kwargs)
        return super().__new__(cls)
