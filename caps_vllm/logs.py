"""Logging shared by the scheduler, the plugin and the observer (no vLLM import)."""

from __future__ import annotations

import logging

#: set by the plugin to the metrics folder it made for `vllm serve` (the scheduler's startup log says so)
OWNED_ENV = "CAPS_VLLM_OWNS_METRICS_DIR"


def route_logs_through_vllm() -> None:
    """Show caps_vllm's INFO logs (table building, fallbacks, capture) in vLLM's own log stream."""
    ours, theirs = logging.getLogger("caps_vllm"), logging.getLogger("vllm")
    if not ours.handlers and theirs.handlers:
        for handler in theirs.handlers:
            ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


class WarnOnce:
    """Logs a message the first time its reason comes up; later ones are only counted by the caller."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.seen: set[str] = set()

    def __call__(self, reason: str, msg: str, *args, log=None) -> None:
        if reason not in self.seen:
            self.seen.add(reason)
            (log or self.logger.warning)(msg, *args)
