"""Synthetic and replayed workloads: arrival times, request sizes, topics and expert-load vectors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest import traces
from loadtest.workload import topic_runs  # the load test's bursty pattern, replayed


@dataclass(frozen=True)
class WorkloadConfig:
    """How requests and their expert loads are generated; defaults are the paper sweep's."""

    num_experts: int = 60
    top_k: int = 4
    layers: int = 1  # vectors are layers x experts long (per-layer counts, flattened)
    topics: int = 8
    hot_experts: int = 8  # experts each topic favours (per layer)
    hot_share: float = 0.08  # share of a topic's routing that goes to its hot experts
    request_concentration: float = 1000.0  # Dirichlet spread of a request around its topic
    burst_len: float = 32.0  # mean length of a run of one topic in the bursty pattern
    prompt_tokens_mean: float = 128.0
    output_tokens_mean: float = 32.0
    #: "counts": prompt-token expert counts (what the live predictor gives, mass grows with the
    #: prompt); "per_token": the same divided by prompt length (equal mass for every request)
    vectors: str = "counts"


@dataclass
class Workload:
    """Requests in arrival order (arrival times in seconds from the first arrival)."""

    arrival: np.ndarray  # (n,) float seconds, non-decreasing
    prompt_tokens: np.ndarray  # (n,) int
    output_tokens: np.ndarray  # (n,) int
    topic: np.ndarray  # (n,) int

    def __len__(self) -> int:
        return self.arrival.shape[0]


def _sizes(n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Log-normal prompt and output lengths (sigma 0.5) around the configured means."""

    def draw(mean: float, lo: int, hi: int) -> np.ndarray:
        sigma = 0.5
        x = rng.lognormal(np.log(mean) - sigma * sigma / 2, sigma, n)
        return np.clip(np.rint(x), lo, hi).astype(np.int64)

    return draw(cfg.prompt_tokens_mean, 4, 4096), draw(cfg.output_tokens_mean, 1, 1024)


def poisson(rate: float, n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> Workload:
    """Poisson arrivals at ``rate`` req/s, topics drawn independently (uniform traffic)."""
    arrival = np.cumsum(rng.exponential(1.0 / rate, n))
    arrival -= arrival[0]
    prompt, output = _sizes(n, cfg, rng)
    return Workload(arrival, prompt, output, rng.integers(cfg.topics, size=n))


def bursty(rate: float, n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> Workload:
    """Poisson arrivals at ``rate`` req/s in runs of one topic (semantic hotspots)."""
    wl = poisson(rate, n, cfg, rng)
    wl.topic = topic_runs(n, cfg.topics, cfg.burst_len, rng)
    return wl


def load_trace(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrival seconds (from the first), prompt and output tokens of a trace in any format
    ``loadtest.traces`` reads (Azure, BurstGPT, Mooncake, plain); a malformed row raises ValueError
    naming the file and line."""
    t = traces.load_trace(path)
    return t.arrival_s, t.prompt_tokens, t.output_tokens


def trace(path: str | Path, rate: float | None, n: int, cfg: WorkloadConfig, rng: np.random.Generator) -> Workload:
    """Replay the first ``n`` requests of a trace (times and sizes), topics in runs as in bursty.

    With ``rate`` the arrival times are scaled so the mean rate is ``rate`` req/s (the trace's
    burst shape is kept); without it they are replayed as recorded.
    """
    t, prompt, output = load_trace(path)
    t, prompt, output = t[:n], np.maximum(prompt[:n], 1), np.maximum(output[:n], 1)
    if rate is not None and t.shape[0] > 1 and t[-1] > 0:
        t = t * ((t.shape[0] - 1) / t[-1] / rate)
    return Workload(t, prompt, output, topic_runs(t.shape[0], cfg.topics, cfg.burst_len, rng))


def topic_profiles(cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """(topics, layers*experts) routing probabilities: each topic leans on a few hot experts per layer."""
    e = cfg.num_experts
    prof = np.full((cfg.topics, cfg.layers, e), (1.0 - cfg.hot_share) / e)
    for t in range(cfg.topics):
        for layer in range(cfg.layers):
            hot = rng.choice(e, size=cfg.hot_experts, replace=False)
            prof[t, layer, hot] += cfg.hot_share / cfg.hot_experts
    return prof.reshape(cfg.topics, cfg.layers * e)


def expert_vectors(wl: Workload, cfg: WorkloadConfig, rng: np.random.Generator) -> np.ndarray:
    """(n, layers*experts) expert loads: prompt_tokens * top_k routings per layer.

    Each request's routing distribution is drawn around its topic's profile (Dirichlet), then
    its counts are multinomial. Per-token distinctness of the top-k is not modelled.
    """
    prof = topic_profiles(cfg, rng)
    n, e, layers = len(wl), cfg.num_experts, cfg.layers
    p = rng.gamma(cfg.request_concentration * prof[wl.topic] + 1e-3).reshape(n, layers, e)
    p /= p.sum(axis=2, keepdims=True)
    tokens = wl.prompt_tokens.astype(np.int64)[:, None]
    counts = rng.multinomial(tokens * cfg.top_k, p).reshape(n, layers * e).astype(np.float64)
    if cfg.vectors == "per_token":
        return counts / tokens
    if cfg.vectors != "counts":
        raise ValueError(f"vectors must be 'counts' or 'per_token', got {cfg.vectors!r}")
    return counts
