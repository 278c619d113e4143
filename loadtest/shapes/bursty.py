"""Topic bursts: Poisson arrivals at --rate, topics in runs of --burst-len."""

from loadtest.llm_load import ArrivalShape


class TopicBursts(ArrivalShape):
    pattern = "bursty"
