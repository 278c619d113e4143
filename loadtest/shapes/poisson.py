"""Poisson arrivals at --rate, topics mixed."""

from loadtest.llm_load import ArrivalShape


class PoissonArrivals(ArrivalShape):
    pattern = "poisson"
