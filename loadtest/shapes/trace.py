"""Replay of --trace (arrival times, output lengths), --speedup."""

from loadtest.llm_load import ArrivalShape


class TraceReplay(ArrivalShape):
    pattern = "trace"
