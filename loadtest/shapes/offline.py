"""An offline batch: --max-requests requests queued while the scheduler is paused (--hold), topics mixed."""

from loadtest.llm_load import ArrivalShape


class OfflineBatch(ArrivalShape):
    pattern = "offline"
